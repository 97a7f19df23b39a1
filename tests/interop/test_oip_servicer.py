"""The OIP servicer and the engine's health statuses in-process, through real aio stubs: typed
and raw tensors, every parameter kind, status codes, and readiness while a pipeline loads."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hotswap.engine.blob_cache import BlobCache
from hotswap.engine.dataplane import DataPlane, InferenceQueue
from hotswap.engine.health import EngineHealth, pipeline_service
from hotswap.engine.host import EngineHost, ModelRef, VersionRef
from hotswap.engine.inference_log import InferenceLog, LogSettings
from hotswap.engine.metrics import EngineMetrics
from hotswap.engine.oip import InferenceServicer, _Answers
from hotswap.engine.runtime import RuntimeOptions
from hotswap.engine.servicers import code_name
from hotswap.oip import grpc_service_pb2 as oip
from hotswap.oip import grpc_service_pb2_grpc as oip_grpc
from hotswap.service.probes import add_probes
from tests.e2e import _api
from tests.engine.test_runtime import two_outputs

Tensor = oip.ModelInferRequest.InferInputTensor
Requested = oip.ModelInferRequest.InferRequestedOutputTensor
MAX_ROWS = 100
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Engine:
    host: EngineHost
    stub: oip_grpc.GRPCInferenceServiceStub
    health: Any
    gate: asyncio.Event  # blob fetches wait for it: a closed gate keeps pipelines loading
    refs: dict[str, VersionRef]
    log: InferenceLog

    async def load(self, *names: str) -> None:
        await self.host.reconcile([self.refs[n] for n in names])


@pytest.fixture
async def engine(tmp_path: Path, assets: Path) -> AsyncIterator[Engine]:
    blobs = {
        "rf": (assets / "models" / "rf_model.onnx").read_bytes(),
        "pm": two_outputs(tmp_path / "pm.onnx").read_bytes(),  # a, b [N,3] -> sum, diff
    }
    by_sha = {hashlib.sha256(data).hexdigest(): data for data in blobs.values()}
    gate = asyncio.Event()
    gate.set()

    async def fetch(sha256: str, offset: int) -> AsyncIterator[bytes]:
        await gate.wait()
        yield by_sha[sha256][offset:]

    refs = {
        name: VersionRef(
            "ws", name, f"{name}-id", 7, (ModelRef(name, "v", hashlib.sha256(data).hexdigest()),)
        )
        for name, data in blobs.items()
    }
    host = EngineHost(BlobCache(tmp_path / "cache", fetch), RuntimeOptions(), 0)
    executor = ThreadPoolExecutor(max_workers=2)
    server = grpc.aio.server()
    log = InferenceLog(LogSettings(tmp_path / "logs"), "engine-test")
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(
            host,
            DataPlane(
                InferenceQueue(executor, 64),
                EngineMetrics(),
                log,
                max_rows=MAX_ROWS,
                code_of=code_name,
            ),
        ),
        server,
    )
    health = await add_probes(server, ["inference.GRPCInferenceService"])
    watcher = asyncio.create_task(
        EngineHealth(host, health, ["inference.GRPCInferenceService"]).run_forever()
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield Engine(
        host,
        oip_grpc.GRPCInferenceServiceStub(channel),
        health_pb2_grpc.HealthStub(channel),
        gate,
        refs,
        log,
    )
    await channel.close()
    watcher.cancel()
    await server.stop(None)
    host.close()
    executor.shutdown()


async def _eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)  # polling interval, not synchronisation


async def _status(engine: Engine, service: str) -> Any:
    response = await engine.health.Check(health_pb2.HealthCheckRequest(service=service))
    return response.status


async def _code(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    return failed.value.code(), failed.value.details() or ""


def _rf_request(x: np.ndarray, **fields: Any) -> oip.ModelInferRequest:
    return oip.ModelInferRequest(
        model_name="rf",
        inputs=[Tensor(name="float_input", datatype="FP32", shape=list(x.shape))],
        raw_input_contents=[x.astype(np.float32).tobytes()],
        **fields,
    )


async def test_not_ready_while_loading_then_ready(engine: Engine) -> None:
    # Nothing applied from the control plane yet: the engine cannot know it is ready.
    ready = await engine.stub.ServerReady(oip.ServerReadyRequest())
    assert not ready.ready
    assert await _status(engine, "") == NOT_SERVING
    assert (await engine.stub.ServerLive(oip.ServerLiveRequest())).live

    engine.gate.clear()
    loading = asyncio.create_task(engine.load("rf"))

    async def listed() -> bool:
        index = await engine.stub.RepositoryIndex(oip.RepositoryIndexRequest())
        return [(m.name, m.state) for m in index.models] == [("rf", "LOADING")]

    await _eventually(listed)
    assert not (await engine.stub.ServerReady(oip.ServerReadyRequest())).ready
    assert not (await engine.stub.ModelReady(oip.ModelReadyRequest(name="rf"))).ready
    x = np.ones((1, 18), dtype=np.float32)
    code, details = await _code(engine.stub.ModelInfer(_rf_request(x)))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "still loading" in details
    code, _ = await _code(engine.stub.ModelMetadata(oip.ModelMetadataRequest(name="rf")))
    assert code == grpc.StatusCode.UNAVAILABLE
    ready_only = await engine.stub.RepositoryIndex(oip.RepositoryIndexRequest(ready=True))
    assert list(ready_only.models) == []

    async def health_is(service: str, status: Any) -> bool:
        return bool(await _status(engine, service) == status)

    await _eventually(lambda: health_is(pipeline_service("ws/rf"), NOT_SERVING))
    assert await _status(engine, "") == NOT_SERVING

    watch = engine.health.Watch(health_pb2.HealthCheckRequest(service=""))
    assert (await watch.read()).status == NOT_SERVING
    engine.gate.set()
    await loading
    assert (await watch.read()).status == SERVING
    watch.cancel()
    assert await _status(engine, pipeline_service("ws/rf")) == SERVING
    assert await _status(engine, "inference.GRPCInferenceService") == SERVING
    assert (await engine.stub.ServerReady(oip.ServerReadyRequest())).ready
    assert (await engine.stub.ModelReady(oip.ModelReadyRequest(name="rf", version="7"))).ready
    assert not (await engine.stub.ModelReady(oip.ModelReadyRequest(name="rf", version="6"))).ready

    # Released: its status stays known, as NOT_SERVING; the engine (assigned nothing) is ready.
    await engine.load()
    await _eventually(lambda: health_is(pipeline_service("ws/rf"), NOT_SERVING))
    assert await _status(engine, "") == SERVING


async def test_typed_and_raw_contents_and_every_parameter_kind(
    engine: Engine, assets: Path
) -> None:
    await engine.load("rf")
    x = np.random.default_rng(0).random((5, 18)) * 10
    expected = _api.reference(assets / "models" / "rf_model.onnx", x.astype(np.float32))
    every_kind = {
        "flag": oip.InferParameter(bool_param=True),
        "count": oip.InferParameter(int64_param=-3),
        "note": oip.InferParameter(string_param="hi"),
        "ratio": oip.InferParameter(double_param=0.5),
        "big": oip.InferParameter(uint64_param=2**64 - 1),
        "workspace": oip.InferParameter(string_param="ws"),
    }
    typed = [
        Tensor(
            name="x",
            datatype="FP32",
            shape=[5, 18],
            contents=oip.InferTensorContents(fp32_contents=x.astype(np.float32).ravel()),
            parameters=every_kind,
        ),
        Tensor(
            name="x",
            datatype="FP64",
            shape=[5, 18],
            contents=oip.InferTensorContents(fp64_contents=x.ravel()),
        ),
    ]
    for tensor in typed:
        response = await engine.stub.ModelInfer(
            oip.ModelInferRequest(
                model_name="rf",
                model_version="7",
                id="abc",
                inputs=[tensor],
                parameters=every_kind,
                outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name="variable")],
            )
        )
        assert (response.model_name, response.model_version, response.id) == ("rf", "7", "abc")
        [output] = response.outputs
        assert (output.name, output.datatype, list(output.shape)) == ("variable", "FP32", [5, 1])
        got = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(5, 1)
        np.testing.assert_array_equal(got, expected)
        assert response.parameters["workspace"].string_param == "ws"
        assert response.parameters["pipeline_version_id"].string_param == "rf-id"
        assert response.parameters["elapsed_ns"].int64_param > 0

    raw = await engine.stub.ModelInfer(_rf_request(x.astype(np.float32)))
    got = np.frombuffer(raw.raw_output_contents[0], dtype="<f4").reshape(5, 1)
    np.testing.assert_array_equal(got, expected)
    # OIP answers are in the inference log like Engine.Infer's (3 requests x 5 rows).
    logged = engine.log.query("ws", "rf", 100)
    assert logged is not None and logged.num_rows == 15
    assert set(logged.column("metadata.pipeline_version").to_pylist()) == {7}
    # Built from the request's arrays off the request path, they hold what was sent and served.
    newest = logged.slice(0, 5)
    sent = np.asarray(newest.column("in.tensor").to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(sent[::-1], x.astype(np.float32))
    served = np.asarray(newest.column("out.variable").to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(served[::-1], expected)


async def test_the_plain_request_path_answers_as_the_general_one(
    engine: Engine, assets: Path
) -> None:
    """One raw tensor of the model's own type and row shape skips the general path's search,
    checks and casts (`_Answers.plain_tensor`); its answers must be the same, byte for byte
    but for the time it took."""
    await engine.load("rf")
    x = (np.random.default_rng(1).random((3, 18)) * 10).astype(np.float32)
    expected = _api.reference(assets / "models" / "rf_model.onnx", x)
    loaded = engine.host.lookup("ws", "rf")
    plain = _rf_request(x, id="same")
    assert loaded.kept(_Answers).plain_tensor(plain, MAX_ROWS) is not None
    general = [
        # Asks for its output by name.
        _rf_request(x, id="same", outputs=[Requested(name="variable")]),
        # Typed contents instead of raw bytes.
        oip.ModelInferRequest(
            model_name="rf",
            id="same",
            inputs=[
                Tensor(
                    name="float_input",
                    datatype="FP32",
                    shape=[3, 18],
                    contents=oip.InferTensorContents(fp32_contents=x.ravel()),
                )
            ],
        ),
        # FP64, which the model's float input takes cast.
        oip.ModelInferRequest(
            model_name="rf",
            id="same",
            inputs=[Tensor(name="float_input", datatype="FP64", shape=[3, 18])],
            raw_input_contents=[x.astype(np.float64).tobytes()],
        ),
    ]
    for request in general:
        assert loaded.kept(_Answers).plain_tensor(request, MAX_ROWS) is None

    def timeless(response: oip.ModelInferResponse) -> bytes:
        assert response.parameters["elapsed_ns"].int64_param > 0
        del response.parameters["elapsed_ns"]
        return response.SerializeToString(deterministic=True)

    answer = await engine.stub.ModelInfer(plain)
    got = np.frombuffer(answer.raw_output_contents[0], dtype="<f4").reshape(3, 1)
    np.testing.assert_array_equal(got, expected)
    assert answer.parameters["models"].string_param == loaded.identity["hotswap.models"]
    plain_answer = timeless(answer)
    for request in general:
        assert timeless(await engine.stub.ModelInfer(request)) == plain_answer


async def test_multi_input_pipeline_takes_tensors_by_name(engine: Engine) -> None:
    await engine.load("pm")
    meta = await engine.stub.ModelMetadata(oip.ModelMetadataRequest(name="pm"))
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("a", "FP32", [-1, 3]),
        ("b", "FP32", [-1, 3]),
    ]
    assert [t.name for t in meta.outputs] == ["sum", "diff"]
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    b = np.full((2, 3), 2, dtype=np.int32)
    request = oip.ModelInferRequest(
        model_name="pm",
        inputs=[  # any order; INT32 values cast to the model's float
            Tensor(name="b", datatype="INT32", shape=[2, 3], contents=_ints(b)),
            Tensor(name="a", datatype="INT32", shape=[2, 3], contents=_ints(a)),
        ],
    )
    both = await engine.stub.ModelInfer(request)
    assert [o.name for o in both.outputs] == ["sum", "diff"]
    total = np.frombuffer(both.raw_output_contents[0], dtype="<f4").reshape(2, 3)
    np.testing.assert_array_equal(total, a + b)

    request.outputs.add(name="diff")
    only = await engine.stub.ModelInfer(request)
    assert [(o.name, list(o.shape)) for o in only.outputs] == [("diff", [2, 3])]
    diff = np.frombuffer(only.raw_output_contents[0], dtype="<f4").reshape(2, 3)
    np.testing.assert_array_equal(diff, a - b)

    del request.inputs[0]
    code, details = await _code(engine.stub.ModelInfer(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "takes inputs ['a', 'b']; got ['a']" in details


def _ints(values: np.ndarray) -> oip.InferTensorContents:
    return oip.InferTensorContents(int_contents=values.ravel().tolist())


def _bad(**fields: Any) -> oip.ModelInferRequest:
    tensor = {"name": "x", "datatype": "FP32", "shape": [1, 18]} | fields.pop("tensor", {})
    fields.setdefault("raw_input_contents", [bytes(4 * 18)])
    fields.setdefault("model_name", "rf")
    return oip.ModelInferRequest(inputs=[Tensor(**tensor)], **fields)


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (_bad(model_name="nope"), "NOT_FOUND", "does not serve pipeline 'nope'"),
        (_bad(model_version="6"), "NOT_FOUND", "version 6 is not served"),
        (_bad(tensor={"datatype": "FP8"}), "INVALID_ARGUMENT", "datatype 'FP8'"),
        (_bad(tensor={"datatype": "BYTES"}), "INVALID_ARGUMENT", "datatype 'BYTES'"),
        (_bad(tensor={"shape": [-1, 18]}), "INVALID_ARGUMENT", "give every dim"),
        # Zero-size dims and element counts past what a message holds: refused, not crashed.
        (_bad(tensor={"shape": [1, 0]}), "INVALID_ARGUMENT", "each at least 1"),
        (_bad(tensor={"shape": [2**31, 0]}), "INVALID_ARGUMENT", "each at least 1"),
        (_bad(tensor={"shape": [2**20, 2**20]}), "INVALID_ARGUMENT", "more than one request"),
        (_bad(raw_input_contents=[b"\0" * 8]), "INVALID_ARGUMENT", "72 raw bytes expected"),
        (_bad(raw_input_contents=[b"", b""]), "INVALID_ARGUMENT", "2 entries for 1 input"),
        (
            _bad(tensor={"contents": {"fp32_contents": [0.0] * 18}}),
            "INVALID_ARGUMENT",
            "has contents and raw_input_contents",
        ),
        (
            _bad(raw_input_contents=[], tensor={"contents": {"fp64_contents": [0.0] * 18}}),
            "INVALID_ARGUMENT",
            "goes in contents.fp32_contents",
        ),
        (
            _bad(raw_input_contents=[], tensor={"contents": {"fp32_contents": [0.0] * 17}}),
            "INVALID_ARGUMENT",
            "18 values expected, got 17",
        ),
        (
            _bad(tensor={"shape": [1, 17]}, raw_input_contents=[bytes(4 * 17)]),
            "INVALID_ARGUMENT",
            "expects 18",
        ),
        (
            _bad(tensor={"shape": [MAX_ROWS + 1, 18]}, raw_input_contents=[bytes(4 * 18 * 101)]),
            "RESOURCE_EXHAUSTED",
            "at most 100",
        ),
        (
            _bad(parameters={"workspace": oip.InferParameter(int64_param=1)}),
            "INVALID_ARGUMENT",
            "'workspace' parameter must be a string",
        ),
        (
            _bad(outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name="y")]),
            "INVALID_ARGUMENT",
            "has no output 'y'",
        ),
    ],
)
async def test_bad_requests_get_the_right_code(
    engine: Engine, request_: oip.ModelInferRequest, code: str, message: str
) -> None:
    await engine.load("rf")
    got, details = await _code(engine.stub.ModelInfer(request_))
    assert got.name == code
    assert message in details


async def test_server_metadata(engine: Engine) -> None:
    meta = await engine.stub.ServerMetadata(oip.ServerMetadataRequest())
    assert meta.name == "hotswap"
    assert list(meta.extensions) == ["model_repository"]
