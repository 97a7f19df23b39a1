"""The Node.js client (clients/node) against a live stack: a client in another language,
loading the .proto files at run time, Arrow built and read by apache-arrow in JavaScript."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.e2e import _api
from tests.interop.conftest import PIPELINE, Deployed

NODE_DIR = Path(__file__).resolve().parents[2] / "clients" / "node"


@pytest.fixture(scope="module")
def node() -> str:
    """The `node` executable, with clients/node's dependencies installed (`npm ci`)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the Node.js client test (Node 18+)")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        installed = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=180,
        )
        if installed.returncode != 0:
            pytest.skip(f"npm ci failed (no registry access?): {installed.stderr[-500:]}")
    return node


def _run(node: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node, *args], cwd=NODE_DIR, capture_output=True, text=True, timeout=30, check=False
    )


def test_cli_sends_the_tutorial_file_and_prints_the_answer(
    node: str, deployed: Deployed, assets: Path, xtest_rows: np.ndarray
) -> None:
    data = assets / "data" / "xtest-1k.arrow"  # an Arrow IPC *file*, sent as it is
    run = _run(
        node, "infer.js", "--engine", deployed.engine, "--pipeline", PIPELINE, "--input", str(data)
    )
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["pipeline"] == PIPELINE
    assert answer["pipeline_version"] == deployed.versions["rf"]
    assert [m["name"] for m in answer["models"]] == ["rf"]
    assert answer["rows"] == len(xtest_rows)
    got = np.asarray(answer["columns"]["out.variable"], dtype=np.float32)
    expected = _api.reference(assets / "models" / "rf_model.onnx", xtest_rows)
    np.testing.assert_array_equal(got, expected)


def test_library_builds_the_table_in_javascript(
    node: str, deployed: Deployed, assets: Path, xtest_rows: np.ndarray
) -> None:
    _api.deploy(deployed.control, PIPELINE, deployed.versions["xgb"])  # input named `input`
    rows = xtest_rows[:5]
    script = """
const { EngineClient, tensorTable } = require('./index');
const [address, pipeline, rows] = process.argv.slice(1);
const client = new EngineClient(address);
client.infer({ workspace: 'ws', pipeline, table: tensorTable(JSON.parse(rows)) })
  .then((a) => console.log(JSON.stringify({ version: a.pipelineVersion, out: a.outputs() })))
  .finally(() => client.close());
"""
    run = _run(node, "-e", script, deployed.engine, PIPELINE, json.dumps(rows.tolist()))
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["version"] == deployed.versions["xgb"]
    got = np.asarray(answer["out"]["out.variable"], dtype=np.float32)
    expected = _api.reference(assets / "models" / "xgb_model.onnx", rows)
    np.testing.assert_array_equal(got, expected)


def test_cli_reports_the_status_code(node: str, deployed: Deployed, assets: Path) -> None:
    data = assets / "data" / "xtest-1k.arrow"
    run = _run(
        node, "infer.js", "--engine", deployed.engine, "--pipeline", "nope", "--input", str(data)
    )
    assert run.returncode == 1
    assert run.stderr.startswith("NOT_FOUND: this engine does not serve pipeline 'nope'")


def test_open_inference_protocol_from_node(
    node: str, deployed: Deployed, assets: Path, xtest_rows: np.ndarray
) -> None:
    """The OIP .proto loaded by protobuf.js: a second, independent reading of its wire format."""
    rows = xtest_rows[:3]
    script = """
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');
const { PROTO_ROOT } = require('./index');
const [address, model, rows] = process.argv.slice(1);
const definition = loader.loadSync('hotswap/oip/grpc_service.proto', {
  includeDirs: [PROTO_ROOT], keepCase: true, longs: Number, defaults: true,
});
const { GRPCInferenceService } = grpc.loadPackageDefinition(definition).inference;
const client = new GRPCInferenceService(address, grpc.credentials.createInsecure());
const x = JSON.parse(rows);
const request = {
  model_name: model,
  inputs: [{ name: 'x', datatype: 'FP32', shape: [x.length, x[0].length],
             contents: { fp32_contents: x.flat() } }],
};
client.ModelMetadata({ name: model }, (err, meta) => {
  if (err) throw err;
  client.ModelInfer(request, (err, answer) => {
    if (err) throw err;
    const raw = answer.raw_output_contents[0];
    const out = new Float32Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.length));
    console.log(JSON.stringify({ input: meta.inputs[0].name, version: answer.model_version,
                                 shape: answer.outputs[0].shape, out: Array.from(out) }));
    client.close();
  });
});
"""
    run = _run(node, "-e", script, deployed.engine, PIPELINE, json.dumps(rows.tolist()))
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["input"] == "float_input"
    assert answer["version"] == str(deployed.versions["rf"])
    assert answer["shape"] == [3, 1]
    expected = _api.reference(assets / "models" / "rf_model.onnx", rows)
    np.testing.assert_array_equal(np.asarray(answer["out"], dtype=np.float32), expected.ravel())
