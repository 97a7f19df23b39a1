#!/usr/bin/env node
'use strict';
/**
 * Sends an Arrow file to a hotswap engine and prints the answer as JSON.
 *
 *   node clients/node/infer.js --engine 127.0.0.1:50061 --pipeline housing \
 *       --input ../shared/assets/data/xtest-1k.arrow [--workspace ws] [--all]
 *
 * Prints {"pipeline", "pipeline_version", "pipeline_version_id", "models", "elapsed_ns",
 * "rows", "columns"}; `columns` holds the `out.*` columns (every column with --all).
 * Exits 1 with the gRPC status and message on stderr when the engine refuses the request.
 */

const fs = require('node:fs');
const { parseArgs } = require('node:util');
const { infer } = require('./index');

async function main() {
  const { values } = parseArgs({
    options: {
      engine: { type: 'string' },
      pipeline: { type: 'string' },
      workspace: { type: 'string', default: '' },
      input: { type: 'string' },
      all: { type: 'boolean', default: false },
    },
  });
  for (const required of ['engine', 'pipeline', 'input']) {
    if (!values[required]) {
      process.stderr.write(`missing --${required}\n`);
      process.exit(2);
    }
  }
  // The engine reads Arrow IPC streams and files alike: the bytes go as they are.
  const table = fs.readFileSync(values.input);
  let answer;
  try {
    answer = await infer(values.engine, {
      workspace: values.workspace,
      pipeline: values.pipeline,
      table,
    });
  } catch (err) {
    const { status } = require('@grpc/grpc-js');
    const name = Object.keys(status).find((k) => status[k] === err.code) || err.code;
    process.stderr.write(`${name}: ${err.details || err.message}\n`);
    process.exit(1);
  }
  const columns = {};
  for (const field of answer.table.schema.fields) {
    if (values.all || field.name.startsWith('out.')) columns[field.name] = answer.column(field.name);
  }
  const result = {
    pipeline: answer.pipeline,
    pipeline_version: answer.pipelineVersion,
    pipeline_version_id: answer.pipelineVersionId,
    models: answer.models,
    elapsed_ns: answer.elapsedNs,
    rows: answer.table.numRows,
    columns,
  };
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

main();
