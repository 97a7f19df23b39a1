'use strict';
/**
 * A small Node.js client for the hotswap engine's `hotswap.v1.Engine/Infer` RPC.
 *
 * It loads the service definition from the repository's `.proto` files at run time (no code
 * generation), sends a table as an Arrow IPC stream and decodes the Arrow answer, which says
 * which pipeline version and which model versions served it.
 *
 *   const { infer, tensorTable } = require('./clients/node');
 *   const answer = await infer('127.0.0.1:50061', {
 *     workspace: 'ws',
 *     pipeline: 'housing',
 *     table: tensorTable([[...18 numbers], [...18 numbers]]),
 *   });
 *   answer.pipelineVersion;            // 3
 *   answer.column('out.variable');     // [[248963.03], [259706.67]]
 *
 * Errors are rejected with the gRPC error (`err.code` is a `grpc.status` value, `err.details`
 * a message for a person): INVALID_ARGUMENT for a table that does not fit the pipeline,
 * NOT_FOUND for a pipeline the engine does not serve, UNAVAILABLE while it is loading.
 */

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const arrow = require('apache-arrow');

/** The repository's `protos/` directory, where `hotswap/v1/engine.proto` lives. */
const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');

/** Same limit as the engine's: large Arrow batches exceed gRPC's 4 MiB default. */
const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;

/**
 * The `hotswap.v1.Engine` client constructor, loaded from the .proto files.
 * @param {string} [protoRoot] the directory holding `hotswap/v1/*.proto`.
 */
function loadEngineService(protoRoot = PROTO_ROOT) {
  const definition = protoLoader.loadSync('hotswap/v1/engine.proto', {
    includeDirs: [protoRoot],
    keepCase: true, // field names as in the .proto: pipeline_version, not pipelineVersion
    longs: String, // int64 fields arrive as decimal strings: no precision lost
    defaults: true,
  });
  return grpc.loadPackageDefinition(definition).hotswap.v1.Engine;
}

/**
 * A table with the tutorial's input convention: one column `tensor` of
 * fixed_size_list<float32>[width], one row per input row.
 * @param {number[][]} rows rows of numbers, all the same length.
 * @returns {arrow.Table}
 */
function tensorTable(rows) {
  const width = rows.length ? rows[0].length : 0;
  const values = new Float32Array(rows.length * width);
  rows.forEach((row, i) => {
    if (row.length !== width) {
      throw new RangeError(`row ${i} has ${row.length} values; row 0 has ${width}`);
    }
    values.set(row, i * width);
  });
  const item = new arrow.Field('item', new arrow.Float32(), false);
  const child = arrow.makeData({ type: new arrow.Float32(), length: values.length, data: values });
  const data = arrow.makeData({
    type: new arrow.FixedSizeList(width, item),
    length: rows.length,
    nullCount: 0,
    child,
  });
  return new arrow.Table({ tensor: arrow.makeVector(data) });
}

/** An answer from the engine: the result table and which versions served it. */
class Answer {
  constructor(response) {
    /** @type {arrow.Table} `time`, `in.<col>`, `out.<name>`, `check_failures`. */
    this.table = arrow.tableFromIPC(response.arrow);
    this.workspace = response.workspace;
    this.pipeline = response.pipeline;
    this.pipelineVersion = Number(response.pipeline_version);
    this.pipelineVersionId = response.pipeline_version_id;
    /** Each step's model: `{name, version, sha256}`. */
    this.models = response.models.map(({ name, version, sha256 }) => ({ name, version, sha256 }));
    this.elapsedNs = Number(response.elapsed_ns);
  }

  /**
   * One column as plain JavaScript values: numbers (64-bit integers too, when they fit), and
   * arrays for list columns.
   * @param {string} name e.g. "out.variable".
   */
  column(name) {
    const vector = this.table.getChild(name);
    if (vector === null) {
      const names = this.table.schema.fields.map((f) => f.name);
      throw new RangeError(`no column ${JSON.stringify(name)} in the answer (${names})`);
    }
    return Array.from(vector, plain);
  }

  /** Every `out.<name>` column, by name. */
  outputs() {
    const out = {};
    for (const field of this.table.schema.fields) {
      if (field.name.startsWith('out.')) out[field.name] = this.column(field.name);
    }
    return out;
  }
}

function plain(value) {
  if (typeof value === 'bigint') {
    return Number.isSafeInteger(Number(value)) ? Number(value) : value.toString();
  }
  if (value !== null && typeof value === 'object' && typeof value.toArray === 'function') {
    return Array.from(value.toArray(), plain);
  }
  return value;
}

/** A connection to one engine; reuse it for many requests, `close()` it when done. */
class EngineClient {
  /**
   * @param {string} address host:port of the engine.
   * @param {object} [options]
   * @param {grpc.ChannelCredentials} [options.credentials] TLS; plaintext by default.
   * @param {string} [options.protoRoot] where the .proto files are.
   */
  constructor(address, { credentials, protoRoot } = {}) {
    const Engine = loadEngineService(protoRoot);
    this._stub = new Engine(address, credentials || grpc.credentials.createInsecure(), {
      'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
      'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
    });
  }

  /**
   * One inference.
   * @param {object} request
   * @param {string} [request.workspace] may be empty when the pipeline name is unique.
   * @param {string} request.pipeline
   * @param {arrow.Table|Uint8Array} request.table an Arrow table, or Arrow IPC bytes (stream
   *   or file) sent as they are.
   * @param {number} [request.timeoutMs=30000]
   * @returns {Promise<Answer>}
   */
  infer({ workspace = '', pipeline, table, timeoutMs = 30000 }) {
    const ipc = table instanceof Uint8Array ? table : arrow.tableToIPC(table, 'stream');
    const message = {
      workspace,
      pipeline,
      arrow: Buffer.from(ipc.buffer, ipc.byteOffset, ipc.byteLength),
    };
    const deadline = new Date(Date.now() + timeoutMs);
    return new Promise((resolve, reject) => {
      this._stub.Infer(message, { deadline }, (err, response) => {
        if (err) reject(err);
        else resolve(new Answer(response));
      });
    });
  }

  close() {
    this._stub.close();
  }
}

/**
 * One inference on a fresh connection (closed afterwards). See `EngineClient.infer`.
 * @param {string} address host:port of the engine.
 */
async function infer(address, request) {
  const client = new EngineClient(address);
  try {
    return await client.infer(request);
  } finally {
    client.close();
  }
}

module.exports = { Answer, EngineClient, PROTO_ROOT, infer, loadEngineService, tensorTable };
