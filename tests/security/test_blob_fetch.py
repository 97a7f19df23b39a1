"""FetchBlob on an open control plane: only digests (never paths), only stored blobs, and a
resumed fetch is verified like a whole one."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from hotswap.clients._stack import LocalStack
from hotswap.control.servicers import BLOB_CHUNK
from hotswap.v1 import control_pb2 as c
from hotswap.v1 import fleet_pb2 as f
from hotswap.v1 import fleet_pb2_grpc as fg
from tests.e2e import _api


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LocalStack]:
    with LocalStack(tmp_path / "stack", engines=0) as running:
        yield running


def _fleet(stack: LocalStack) -> Any:
    return fg.FleetStub(grpc.insecure_channel(stack.control_address))  # type: ignore[arg-type]


def _fetch(stack: LocalStack, sha256: str, offset: int = 0) -> bytes:
    request = f.FetchBlobRequest(sha256=sha256, offset=offset)
    return b"".join(chunk.data for chunk in _fleet(stack).FetchBlob(request, timeout=10))


def _code(stack: LocalStack, sha256: str, offset: int = 0) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as excinfo:
        _fetch(stack, sha256, offset)
    error: Any = excinfo.value
    return error.code(), error.details() or ""


def _big_model() -> bytes:
    """y = x + b over 18 features, padded with a 3 MiB unused initializer (over 2 chunks)."""
    bias = numpy_helper.from_array(np.zeros((18,), np.float32), "b")
    pad = numpy_helper.from_array(np.arange(3 * 2**18, dtype=np.float32), "pad")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 18])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 18])],
        initializer=[bias, pad],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


@pytest.mark.parametrize(
    "name",
    [
        "/etc/hostname",  # an absolute path replaced the blob root
        "../../../../etc/hostname",
        "AB" * 32,  # hex, but not lowercase
        "0" * 63,
        "",
    ],
)
def test_names_that_are_not_digests_are_refused_before_any_path(
    stack: LocalStack, name: str
) -> None:
    code, message = _code(stack, name, offset=1)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "64 lowercase hex digits" in message


def test_only_stored_blobs_are_served(stack: LocalStack, assets: Path) -> None:
    stub = _api.control(stack.control_address)
    stub.CreateWorkspace(c.CreateWorkspaceRequest(name=_api.WS))
    data = (assets / "models" / "rf_model.onnx").read_bytes()
    sha = _api.upload(stub, "rf", data).sha256
    assert _fetch(stack, sha) == data
    assert _fetch(stack, sha, offset=1000) == data[1000:]
    # A well-formed digest of something the store never took.
    code, _ = _code(stack, hashlib.sha256(b"not uploaded").hexdigest())
    assert code == grpc.StatusCode.NOT_FOUND


def test_a_corrupt_blob_is_data_loss_whole_or_resumed(stack: LocalStack) -> None:
    stub = _api.control(stack.control_address)
    stub.CreateWorkspace(c.CreateWorkspaceRequest(name=_api.WS))
    data = _big_model()
    assert len(data) > 2 * BLOB_CHUNK
    sha = _api.upload(stub, "big", data).sha256
    blob = stack.data_dir / "control" / "blobs" / sha[:2] / sha
    corrupted = bytearray(data)
    corrupted[10] ^= 0xFF  # in the first chunk: a resumed fetch never sends it
    blob.write_bytes(bytes(corrupted))
    for offset in (0, BLOB_CHUNK + 5):
        code, message = _code(stack, sha, offset)
        assert code == grpc.StatusCode.DATA_LOSS
        assert "corrupt on the control plane's disk" in message
