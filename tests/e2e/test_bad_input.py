"""Bad input gets the right status code and a message a person can act on, and changes
nothing: afterwards everything still serves correctly."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pytest

from hotswap.clients._stack import LocalStack
from hotswap.v1 import control_pb2 as c
from hotswap.v1 import engine_pb2
from tests.e2e import _api
from tests.e2e.conftest import seed_models


@pytest.fixture
def deployed(stack: LocalStack, assets: Path) -> tuple[Any, Any]:
    stub = _api.control(stack.control_address)
    seed_models(stub, assets)
    _api.deploy(stub, "housing", _api.new_version(stub, "housing", "rf").number)
    return stub, _api.engine(stack.engine_addresses[0])


def _blob_files(stack: LocalStack) -> list[Path]:
    blobs = stack.data_dir / "control" / "blobs"
    return sorted(p for p in blobs.rglob("*") if p.is_file())


def _error(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as excinfo:
        call()
    error: Any = excinfo.value
    return error.code(), error.details() or ""


def test_bad_uploads_store_nothing(
    stack: LocalStack, deployed: tuple[Any, Any], assets: Path
) -> None:
    stub, _ = deployed
    before_models = stub.ListModels(c.ListModelsRequest(workspace=_api.WS))
    before_blobs = _blob_files(stack)
    good = (assets / "models" / "gbr_model.onnx").read_bytes()

    code, message = _error(lambda: _api.upload(stub, "junk", b"definitely not onnx" * 100))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a loadable ONNX model" in message and "Traceback" not in message

    code, message = _error(lambda: _api.upload(stub, "truncated", good[: len(good) // 2]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT

    wrong_sha = hashlib.sha256(b"other").hexdigest()
    code, message = _error(
        lambda: stub.UploadModel(_api.upload_requests("gbr2", good, sha256=wrong_sha))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "sha256 mismatch" in message

    code, message = _error(
        lambda: stub.UploadModel(_api.upload_requests("gbr2", good, workspace="nope"))
    )
    assert code == grpc.StatusCode.NOT_FOUND and "workspace 'nope'" in message

    code, message = _error(lambda: _api.upload(stub, "../etc/passwd", good))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "invalid model name" in message

    assert stub.ListModels(c.ListModelsRequest(workspace=_api.WS)) == before_models
    assert _blob_files(stack) == before_blobs
    assert list((stack.data_dir / "control" / "blobs" / "tmp").iterdir()) == []


def _table_body(column: pa.Array, name: str = "tensor") -> bytes:
    return _api.ipc_stream(pa.table({name: column}))


def test_bad_infer_requests_are_refused_and_serving_continues(
    deployed: tuple[Any, Any], assets: Path, xtest: np.ndarray
) -> None:
    _, engine = deployed
    cases = {
        "not arrow": b"\x00\x01 this is not an arrow stream",
        "width 17": _api.ipc_stream(_api.tensor_table(xtest[:2, :17])),
        "strings": _table_body(pa.array([["a"] * 18, ["b"] * 18])),
        "wrong column": _api.ipc_stream(_api.tensor_table(xtest[:2]).rename_columns(["features"])),
    }
    for case, body in cases.items():
        code, message = _error(lambda body=body: _api.infer(engine, "housing", body))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, case
        assert message and "Traceback" not in message, case

    code, message = _error(lambda: _api.infer(engine, "nosuch", b""))
    assert code == grpc.StatusCode.NOT_FOUND and "nosuch" in message

    # Column groups an answer may leave out are checked by the engine too, not only the SDK.
    request = engine_pb2.InferRequest(
        workspace=_api.WS,
        pipeline="housing",
        arrow=_api.ipc_stream(_api.tensor_table(xtest[:1])),
        dataset_exclude=["inputs"],
    )
    code, message = _error(lambda: engine.Infer(request, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "column groups" in message

    # A zero-width list column beside the tensor is echoed back (pyarrow crashes the process
    # if asked to rebuild one: a request's own column must never be rebuilt that way).
    odd = _api.tensor_table(xtest[:2]).append_column(
        "z", pa.array([[], []], pa.list_(pa.float32(), 0))
    )
    echoed = _api.infer(engine, "housing", _api.ipc_stream(odd))
    assert echoed.table.column("in.z").to_pylist() == [[], []]

    # Still serving, correctly.
    answer = _api.infer(engine, "housing", _api.ipc_stream(_api.tensor_table(xtest[:3])))
    np.testing.assert_array_equal(
        answer.outputs(), _api.reference(assets / "models" / "rf_model.onnx", xtest[:3])
    )


def test_unknown_names_and_undeployed_pipelines(
    stack: LocalStack, deployed: tuple[Any, Any]
) -> None:
    stub, engine = deployed
    not_found = {
        "model": lambda: stub.GetModel(c.GetModelRequest(workspace=_api.WS, name="nope")),
        "model version": lambda: stub.CreatePipelineVersion(
            c.CreatePipelineVersionRequest(
                workspace=_api.WS,
                pipeline="housing",
                steps=[c.StepRef(model="rf", version="not-a-version")],
            )
        ),
        "pipeline": lambda: stub.GetPipeline(c.GetPipelineRequest(workspace=_api.WS, name="x")),
        "pipeline version": lambda: _api.deploy(stub, "housing", 99),
        "workspace": lambda: stub.ListModels(c.ListModelsRequest(workspace="nope")),
    }
    for what, call in not_found.items():
        code, message = _error(call)
        assert code == grpc.StatusCode.NOT_FOUND, what
        assert "not found" in message or "no version" in message, what

    code, _ = _error(lambda: stub.CreateWorkspace(c.CreateWorkspaceRequest(name=_api.WS)))
    assert code == grpc.StatusCode.ALREADY_EXISTS

    stub.CreatePipeline(c.CreatePipelineRequest(workspace=_api.WS, name="idle"))
    _api.new_version(stub, "idle", "gbr")
    code, message = _error(lambda: _api.endpoints(stub, "idle"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "not deployed" in message
    code, message = _error(lambda: _api.infer(engine, "idle", b""))
    assert code == grpc.StatusCode.NOT_FOUND and "is it deployed" in message

    pipeline = stub.GetPipeline(c.GetPipelineRequest(workspace=_api.WS, name="housing"))
    assert pipeline.deployed.number == 1
