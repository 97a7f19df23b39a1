"""Hostile and malformed input: each gets its status code and an actionable message, and
nothing changes (no model, no blob, no temp file, no deployment change, no crash)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pytest

from hotswap.clients._stack import LocalStack
from hotswap.v1 import control_pb2 as c
from tests.e2e import _api
from tests.e2e.conftest import seed_models
from tests.reliability import _onnx

LIMIT = 300_000  # bytes: rf (225 KB) fits, a 400 KB model does not


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> Iterator[LocalStack]:
    with LocalStack(
        tmp_path_factory.mktemp("hostile"),
        control_args=("--max-model-bytes", str(LIMIT)),
        engine_args=("--max-rows", "5000"),
    ) as stack:
        stub = _api.control(stack.control_address)
        seed_models(stub, assets)
        _api.deploy(stub, "housing", _api.new_version(stub, "housing", "rf").number)
        yield stack


def _snapshot(stack: LocalStack) -> tuple[Any, ...]:
    stub = _api.control(stack.control_address)
    blobs = stack.data_dir / "control" / "blobs"
    return (
        stub.ListModels(c.ListModelsRequest(workspace=_api.WS)),
        stub.ListPipelines(c.ListPipelinesRequest(workspace=_api.WS)),
        sorted(str(p) for p in blobs.rglob("*") if p.is_file()),
    )


def _error(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as excinfo:
        call()
    error: Any = excinfo.value
    return error.code(), error.details() or ""


def _serves_rf(stack: LocalStack, assets: Path) -> None:
    x = np.ones((2, 18), np.float32)
    answer = _api.infer(
        _api.engine(stack.engine_addresses[0]), "housing", _api.ipc_stream(_api.tensor_table(x))
    )
    np.testing.assert_array_equal(
        answer.outputs(), _api.reference(assets / "models" / "rf_model.onnx", x)
    )


@pytest.mark.parametrize(
    ("name", "data", "needle"),
    [
        ("not-onnx", b"\x89PNG\r\n\x1a\n" + b"\x00" * 500, "not a loadable ONNX model"),
        ("unknown-op", _onnx.unknown_operator(), "not a loadable ONNX model"),
        ("custom-domain", _onnx.custom_domain(), "not a loadable ONNX model"),
        ("ext-escape", _onnx.external_data("../../etc/passwd"), "tensor 'w' keeps its data"),
        ("ext-absolute", _onnx.external_data("/etc/passwd"), "tensor 'w' keeps its data"),
        # A sibling blob in the cache would be another model's bytes: refused too.
        ("ext-sibling", _onnx.external_data("weights.bin"), "tensor 'w' keeps its data"),
        # The file itself, which exists wherever the model is loaded from: ONNX Runtime would
        # read these bytes as the weight, so only hotswap's own inspection refuses it.
        ("ext-itself", _onnx.external_data("model.onnx"), "tensor 'w' keeps its data"),
        # The same, hidden in a local function's attribute default.
        ("ext-function", _onnx.external_in_function_default("model.onnx"), "tensor 'w' keeps"),
    ],
)
def test_hostile_models_are_refused(
    hostile: LocalStack, assets: Path, name: str, data: bytes, needle: str
) -> None:
    before = _snapshot(hostile)
    code, message = _error(lambda: _api.upload(_api.control(hostile.control_address), name, data))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in message and "Traceback" not in message
    assert _snapshot(hostile) == before
    _serves_rf(hostile, assets)


def test_too_large_models_are_refused_before_and_while_streaming(
    hostile: LocalStack, assets: Path
) -> None:
    stub = _api.control(hostile.control_address)
    before = _snapshot(hostile)
    big = (assets / "models" / "rf_model.onnx").read_bytes() * 2  # ~450 KB
    code, message = _error(lambda: _api.upload(stub, "big", big))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and str(LIMIT) in message

    def lying_header() -> Iterator[c.UploadModelRequest]:
        for i, request in enumerate(_api.upload_requests("big", big)):
            if i == 0:
                request.header.size_bytes = 0  # the size is only found out while streaming
            yield request

    code, message = _error(lambda: stub.UploadModel(lying_header()))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _snapshot(hostile) == before


def test_an_interrupted_upload_leaves_nothing(hostile: LocalStack, assets: Path) -> None:
    stub = _api.control(hostile.control_address)
    before = _snapshot(hostile)
    data = (assets / "models" / "gbr_model.onnx").read_bytes()
    sent_some = threading.Event()

    def interrupted() -> Iterator[c.UploadModelRequest]:
        for i, request in enumerate(_api.upload_requests("cut", data)):
            if i == 2:
                sent_some.set()
                raise ConnectionError("the client went away")
            yield request

    with pytest.raises(grpc.RpcError) as excinfo:
        stub.UploadModel(interrupted())
    assert sent_some.is_set()
    assert excinfo.value.code() == grpc.StatusCode.UNKNOWN
    tmp = hostile.data_dir / "control" / "blobs" / "tmp"
    _api.until(lambda: not list(tmp.iterdir()), "the cancelled upload's temp file to go", 10)
    assert _snapshot(hostile) == before


def test_wrong_sha256_and_missing_header(hostile: LocalStack, assets: Path) -> None:
    stub = _api.control(hostile.control_address)
    before = _snapshot(hostile)
    data = (assets / "models" / "gbr_model.onnx").read_bytes()
    code, message = _error(lambda: stub.UploadModel(_api.upload_requests("g", data, "ab" * 32)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "sha256 mismatch" in message
    code, message = _error(lambda: stub.UploadModel(_api.upload_requests("g", data, "nothex")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "64 lowercase hex" in message
    chunks_only = iter([c.UploadModelRequest(chunk=data[:100])])
    code, message = _error(lambda: stub.UploadModel(chunks_only))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "header" in message
    assert _snapshot(hostile) == before


@pytest.mark.parametrize(
    "name", ["a/b", "..", "x\\y", "tab\tname", "nul\x00", "new\nline", "x" * 10_000, "", " lead"]
)
def test_hostile_names_are_refused(hostile: LocalStack, name: str) -> None:
    stub = _api.control(hostile.control_address)
    before = _snapshot(hostile)
    calls = [
        lambda: stub.CreateWorkspace(c.CreateWorkspaceRequest(name=name)),
        lambda: stub.CreatePipeline(c.CreatePipelineRequest(workspace=_api.WS, name=name)),
        lambda: _api.upload(stub, name, b"irrelevant"),
    ]
    for call in calls:
        code, message = _error(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert len(message) < 300  # a 10,000-character name is not echoed back whole
    assert _snapshot(hostile) == before


def _column(values: list[Any], type_: pa.DataType) -> bytes:
    return _api.ipc_stream(pa.table({"tensor": pa.array(values, type=type_)}))


def test_hostile_arrow_is_refused(hostile: LocalStack, assets: Path) -> None:
    engine = _api.engine(hostile.engine_addresses[0])
    row = [1.0] * 18
    floats = pa.list_(pa.float32())
    cases: dict[str, tuple[bytes, grpc.StatusCode]] = {
        "not arrow": (b"ARROW1\x00\x00garbage", grpc.StatusCode.INVALID_ARGUMENT),
        "empty bytes": (b"", grpc.StatusCode.INVALID_ARGUMENT),
        "null row": (_column([row, None], floats), grpc.StatusCode.INVALID_ARGUMENT),
        "null value": (_column([[*row[:17], None]], floats), grpc.StatusCode.INVALID_ARGUMENT),
        "ragged": (_column([row, row[:5]], floats), grpc.StatusCode.INVALID_ARGUMENT),
        "zero rows": (_column([], floats), grpc.StatusCode.INVALID_ARGUMENT),
        "width 19": (_column([[*row, 1.0]], floats), grpc.StatusCode.INVALID_ARGUMENT),
        "strings": (_column([["1"] * 18], pa.list_(pa.string())), grpc.StatusCode.INVALID_ARGUMENT),
        "too many rows": (
            _api.ipc_stream(_api.tensor_table(np.zeros((5001, 18), np.float32))),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
    }
    for case, (body, expected) in cases.items():
        code, message = _error(lambda body=body: _api.infer(engine, "housing", body))
        assert code == expected, case
        assert message and "Traceback" not in message, case
    _serves_rf(hostile, assets)
