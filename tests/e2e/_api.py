"""Raw-stub helpers for end-to-end tests: what any gRPC client of hotswap would write."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pyarrow as pa

from hotswap.v1 import control_pb2 as c
from hotswap.v1 import control_pb2_grpc as cg
from hotswap.v1 import engine_pb2 as e
from hotswap.v1 import engine_pb2_grpc as eg

WS = "ws"
CHUNK = 64 * 1024


def control(address: str) -> Any:
    return cg.ControlPlaneStub(grpc.insecure_channel(address))  # type: ignore[arg-type]


def engine(address: str) -> Any:
    return eg.EngineStub(grpc.insecure_channel(address))  # type: ignore[arg-type]


def upload_requests(
    name: str, data: bytes, sha256: str | None = None, workspace: str = WS
) -> Iterator[c.UploadModelRequest]:
    header = c.UploadModelHeader(
        workspace=workspace,
        name=name,
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
    )
    yield c.UploadModelRequest(header=header)
    for i in range(0, len(data), CHUNK):
        yield c.UploadModelRequest(chunk=data[i : i + CHUNK])


def upload(stub: Any, name: str, data: bytes) -> Any:
    return stub.UploadModel(upload_requests(name, data))


def new_version(stub: Any, pipeline: str, *models: str) -> Any:
    return stub.CreatePipelineVersion(
        c.CreatePipelineVersionRequest(
            workspace=WS, pipeline=pipeline, steps=[c.StepRef(model=m) for m in models]
        )
    )


def deploy(stub: Any, pipeline: str, version: int, replicas: int = 0) -> Any:
    return stub.Deploy(
        c.DeployRequest(workspace=WS, pipeline=pipeline, version=version, replicas=replicas)
    )


def endpoints(stub: Any, pipeline: str) -> list[str]:
    found = stub.GetPipelineEndpoints(
        c.GetPipelineEndpointsRequest(workspace=WS, pipeline=pipeline)
    )
    return list(found.addresses)


def ipc_stream(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def tensor_table(x: np.ndarray) -> pa.Table:
    flat = pa.array(np.ascontiguousarray(x, dtype=np.float32).ravel())
    return pa.table({"tensor": pa.FixedSizeListArray.from_arrays(flat, x.shape[1])})


@dataclass
class Answer:
    version: int
    models: list[str]
    table: pa.Table

    def outputs(self, column: str = "out.variable") -> np.ndarray:
        col = self.table.column(column).combine_chunks()
        return np.asarray(col.flatten().to_numpy(zero_copy_only=False)).reshape(len(col), -1)


def infer(stub: Any, pipeline: str, body: bytes, timeout: float = 10) -> Answer:
    response = stub.Infer(
        e.InferRequest(workspace=WS, pipeline=pipeline, arrow=body), timeout=timeout
    )
    table = pa.ipc.open_stream(response.arrow).read_all()
    return Answer(response.pipeline_version, [m.name for m in response.models], table)


def reference(model: Path, x: np.ndarray) -> np.ndarray:
    """In-process ONNX Runtime with the engine's default settings (one intra-op thread)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def until(
    check: Callable[[], bool], what: str, timeout: float = 20, interval: float = 0.01
) -> None:
    """Polls `check` until it is true; fails naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout:g}s waiting for {what}"
        time.sleep(interval)


def rpc_code(excinfo: Any) -> grpc.StatusCode:
    return excinfo.value.code()  # type: ignore[no-any-return]
