"""The SDK against small in-process fake servers: real gRPC errors become typed errors, engines
are balanced, batched, retried and timed out. The live stack is in test_sdk_live.py."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pandas as pd
import pyarrow as pa
import pytest

import hotswap
from hotswap.clients._convert import from_ipc, to_ipc
from hotswap.v1 import control_pb2, engine_pb2, types_pb2

Handler = Callable[[Any, grpc.ServicerContext], Any]


def _serve(service: str, methods: dict[str, tuple[Handler, type[Any]]]) -> tuple[grpc.Server, str]:
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        name: grpc.unary_unary_rpc_method_handler(
            fn,
            request_deserializer=req.FromString,
            response_serializer=lambda m: m.SerializeToString(),
        )
        for name, (fn, req) in methods.items()
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@dataclass
class FakeEngine:
    """Answers Infer with out.variable = sum of each row's tensor, or fails as told."""

    fail_with: grpc.StatusCode | None = None
    block: threading.Event | None = None
    requests: list[int] = field(default_factory=list)

    def infer(self, request: engine_pb2.InferRequest, context: grpc.ServicerContext) -> Any:
        if self.block is not None:
            self.block.wait(10)
        if self.fail_with is not None:
            context.abort(self.fail_with, "pipeline 'p' is still loading")
        table = from_ipc(request.arrow)
        self.requests.append(table.num_rows)
        sums = [sum(r) for r in table["tensor"].to_pylist()]
        out = pa.table(
            {
                "in.tensor": table["tensor"],
                "out.variable": pa.array([[s] for s in sums], pa.list_(pa.float32())),
                "check_failures": pa.array([0] * table.num_rows, pa.int32()),
            }
        ).replace_schema_metadata({"hotswap.pipeline_version": "7"})
        return engine_pb2.InferResponse(
            arrow=to_ipc(out),
            pipeline="p",
            pipeline_version=7,
            pipeline_version_id="pv-7",
            models=[types_pb2.ServedModel(name="m", version="mv", sha256="ab")],
        )


@dataclass
class FakeControl:
    endpoints: list[list[str]]
    abort_code: grpc.StatusCode | None = None
    endpoint_calls: int = 0

    def methods(self) -> dict[str, tuple[Handler, type[Any]]]:
        return {
            "ListWorkspaces": (self.list_workspaces, control_pb2.ListWorkspacesRequest),
            "GetPipelineEndpoints": (self.get_endpoints, control_pb2.GetPipelineEndpointsRequest),
            "GetPipeline": (self.get_pipeline, control_pb2.GetPipelineRequest),
        }

    def list_workspaces(self, _: Any, context: grpc.ServicerContext) -> Any:
        if self.abort_code is not None:
            context.abort(self.abort_code, f"told to fail with {self.abort_code.name}")
        return control_pb2.ListWorkspacesResponse(
            workspaces=[control_pb2.Workspace(name="default"), control_pb2.Workspace(name="ws")]
        )

    def get_endpoints(self, _: Any, __: grpc.ServicerContext) -> Any:
        addresses = self.endpoints[min(self.endpoint_calls, len(self.endpoints) - 1)]
        self.endpoint_calls += 1
        return control_pb2.PipelineEndpoints(version=7, addresses=addresses)

    def get_pipeline(self, request: Any, _: grpc.ServicerContext) -> Any:
        return control_pb2.Pipeline(workspace="ws", name=request.name)


@pytest.fixture
def servers() -> Iterator[list[grpc.Server]]:
    started: list[grpc.Server] = []
    yield started
    for s in started:
        s.stop(None)


def _engine(servers: list[grpc.Server], engine: FakeEngine) -> str:
    server, address = _serve(
        "hotswap.v1.Engine", {"Infer": (engine.infer, engine_pb2.InferRequest)}
    )
    servers.append(server)
    return address


def _pipeline(servers: list[grpc.Server], control: FakeControl) -> hotswap.Pipeline:
    server, address = _serve("hotswap.v1.ControlPlane", control.methods())
    servers.append(server)
    client = hotswap.Client(address)
    client.set_current_workspace("ws")
    return client.get_pipeline("p")


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.NOT_FOUND, hotswap.EntityNotFoundError),
        (grpc.StatusCode.FAILED_PRECONDITION, hotswap.DeploymentError),
        (grpc.StatusCode.ABORTED, hotswap.ConcurrentDeployError),
        (grpc.StatusCode.INTERNAL, hotswap.ServerError),
    ],
)
def test_server_errors_are_typed_without_grpc_tracebacks(
    servers: list[grpc.Server], code: grpc.StatusCode, cls: type[hotswap.HotswapError]
) -> None:
    server, address = _serve("hotswap.v1.ControlPlane", FakeControl([[]], code).methods())
    servers.append(server)
    with pytest.raises(cls) as info:
        hotswap.Client(address).list_workspaces()
    assert f"told to fail with {code.name}" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_unreachable_control_plane_says_how_to_start_one() -> None:
    with pytest.raises(hotswap.UnavailableError, match="hotswap up"):
        hotswap.Client("127.0.0.1:1").list_workspaces()


def test_default_address_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOTSWAP_ADDRESS", "10.1.2.3:4")
    assert hotswap.Client().address == "10.1.2.3:4"
    monkeypatch.delenv("HOTSWAP_ADDRESS")
    assert hotswap.Client().address == "localhost:50051"
    assert hotswap.Client("h:1").address == "h:1"


def test_get_workspace_raises_or_returns(servers: list[grpc.Server]) -> None:
    server, address = _serve("hotswap.v1.ControlPlane", FakeControl([[]]).methods())
    servers.append(server)
    client = hotswap.Client(address)
    assert client.get_workspace("ws").name() == "ws"
    with pytest.raises(hotswap.EntityNotFoundError, match="'nope'"):
        client.get_workspace("nope")


def test_requests_are_batched_and_balanced_round_robin(servers: list[grpc.Server]) -> None:
    a, b = FakeEngine(), FakeEngine()
    pipeline = _pipeline(servers, FakeControl([[_engine(servers, a), _engine(servers, b)]]))
    rows = [[float(i), 1.0] for i in range(5)]
    out = pipeline.infer(pd.DataFrame({"tensor": rows}), batch_rows=2)
    assert out["out.variable"].tolist() == [[i + 1.0] for i in range(5)]
    assert sorted(a.requests + b.requests) == [1, 2, 2]
    assert a.requests and b.requests
    assert out.attrs["hotswap.pipeline_version"] == 7
    served = pipeline.last_served()
    assert served is not None and served.pipeline_version == 7


def test_arrow_in_arrow_out(servers: list[grpc.Server]) -> None:
    pipeline = _pipeline(servers, FakeControl([[_engine(servers, FakeEngine())]]))
    table = pa.table({"tensor": pa.array([[1.0, 2.0]], pa.list_(pa.float32(), 2))})
    out = pipeline.infer(table)
    assert isinstance(out, pa.Table)
    assert out.column_names == ["in.tensor", "out.variable", "check_failures"]
    assert out.schema.metadata == {b"hotswap.pipeline_version": b"7"}
    batch = pipeline.infer(table.to_batches()[0])
    assert batch.equals(out)


def test_an_unavailable_engine_triggers_a_refresh_and_one_retry(
    servers: list[grpc.Server],
) -> None:
    gone = _engine(servers, FakeEngine(fail_with=grpc.StatusCode.UNAVAILABLE))
    good = FakeEngine()
    control = FakeControl([[gone], [_engine(servers, good)]])
    pipeline = _pipeline(servers, control)
    out = pipeline.infer(pa.table({"tensor": [[1.0, 2.0]]}))
    assert out["out.variable"].to_pylist() == [[3.0]]
    assert control.endpoint_calls == 2
    assert good.requests == [1]


def test_when_every_engine_fails_the_error_is_typed(servers: list[grpc.Server]) -> None:
    gone = _engine(servers, FakeEngine(fail_with=grpc.StatusCode.UNAVAILABLE))
    pipeline = _pipeline(servers, FakeControl([[gone]]))
    with pytest.raises(hotswap.UnavailableError, match=f"engine {gone}: .*still loading"):
        pipeline.infer(pa.table({"tensor": [[1.0]]}))


def test_no_engines_on_an_undeployed_pipeline(servers: list[grpc.Server]) -> None:
    pipeline = _pipeline(servers, FakeControl([[]]))
    with pytest.raises(hotswap.DeploymentError, match="not deployed"):
        pipeline.infer(pa.table({"tensor": [[1.0]]}))


def test_a_slow_inference_raises_a_timeout_that_says_what_to_do(
    servers: list[grpc.Server],
) -> None:
    release = threading.Event()
    pipeline = _pipeline(servers, FakeControl([[_engine(servers, FakeEngine(block=release))]]))
    try:
        with pytest.raises(hotswap.InferenceTimeoutError, match=r"timeout=30") as info:
            pipeline.infer(pa.table({"tensor": [[1.0]]}), timeout=0.2)
    finally:
        release.set()
    assert "replica_count" in str(info.value)
    assert isinstance(info.value, TimeoutError)


def test_bad_input_types_are_rejected(servers: list[grpc.Server]) -> None:
    pipeline = _pipeline(servers, FakeControl([[]]))
    with pytest.raises(hotswap.InvalidInputError, match="infer_from_file"):
        pipeline.infer("houses.df.json")


def test_only_onnx_is_accepted(tmp_path: Path) -> None:
    with pytest.raises(hotswap.InvalidInputError, match="only ONNX"):
        hotswap.Client("127.0.0.1:1").upload_model("m", tmp_path / "m.pt", framework="pytorch")


def test_uploads_stream_a_header_then_1_mib_chunks(
    servers: list[grpc.Server], tmp_path: Path
) -> None:
    received: list[control_pb2.UploadModelRequest] = []

    def upload(requests: Iterator[control_pb2.UploadModelRequest], _: Any) -> Any:
        received.extend(requests)
        header = received[0].header
        return types_pb2.ModelVersion(workspace=header.workspace, name=header.name, version="v1")

    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "UploadModel": grpc.stream_unary_rpc_method_handler(
            upload,
            request_deserializer=control_pb2.UploadModelRequest.FromString,
            response_serializer=types_pb2.ModelVersion.SerializeToString,
        ),
        "ListWorkspaces": grpc.unary_unary_rpc_method_handler(
            lambda *_: control_pb2.ListWorkspacesResponse(
                workspaces=[control_pb2.Workspace(name="default")]
            ),
            request_deserializer=control_pb2.ListWorkspacesRequest.FromString,
            response_serializer=control_pb2.ListWorkspacesResponse.SerializeToString,
        ),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("hotswap.v1.ControlPlane", handlers)]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servers.append(server)

    data = bytes(range(256)) * (10 * 1024 + 2)  # 2.5 MiB and a bit
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    progress: list[tuple[int, int]] = []
    model = hotswap.Client(f"127.0.0.1:{port}").upload_model(
        "m", path, progress=lambda sent, total: progress.append((sent, total))
    )
    assert (model.name(), model.workspace(), model.version()) == ("m", "default", "v1")
    header = received[0].header
    assert header.sha256 == hashlib.sha256(data).hexdigest()
    assert header.size_bytes == len(data)
    chunks = [r.chunk for r in received[1:]]
    assert [len(c) for c in chunks] == [2**20, 2**20, len(data) - 2 * 2**20]
    assert b"".join(chunks) == data
    assert progress[-1] == (len(data), len(data)) and len(progress) == 3
