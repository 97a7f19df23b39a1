"""The upload path without grpc: property-based garbage never stores anything."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hotswap.control.blobs import BlobStore
from hotswap.control.errors import InvalidArgument, LimitExceeded
from hotswap.control.store import Store
from hotswap.control.uploads import ModelUploads, UploadHeader


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _uploads(root: Path, limit: int = 1_000_000) -> tuple[Store, BlobStore, ModelUploads]:
    store = Store(root / "db")
    if not store.list_workspaces():
        store.create_workspace("ws")
    blobs = BlobStore(root / "blobs")
    return store, blobs, ModelUploads(store, blobs, limit)


def _files(root: Path) -> list[Path]:
    return [p for p in (root / "blobs").rglob("*") if p.is_file()]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(min_size=1, max_size=4096), chunk=st.integers(1, 1024))
def test_garbage_never_becomes_a_model(tmp_path: Path, data: bytes, chunk: int) -> None:
    store, _, uploads = _uploads(tmp_path)
    header = UploadHeader("ws", "garbage", hashlib.sha256(data).hexdigest(), len(data))
    with pytest.raises(InvalidArgument):
        asyncio.run(uploads.upload(header, _chunks(data, chunk)))
    assert store.list_models("ws") == []
    assert _files(tmp_path) == []


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(chunk=st.integers(1, 300_000), cut=st.integers(0, 100))
def test_any_chunking_of_a_real_model_stores_it_once(
    tmp_path: Path, assets: Path, chunk: int, cut: int
) -> None:
    data = (assets / "models" / "rf_model.onnx").read_bytes()
    store, blobs, uploads = _uploads(tmp_path)
    sha = hashlib.sha256(data).hexdigest()
    model = asyncio.run(uploads.upload(UploadHeader("ws", "rf", sha, 0), _chunks(data, chunk)))
    assert model.sha256 == sha and blobs.path(sha).read_bytes() == data
    # A truncated copy of the same upload fails and adds nothing.
    with pytest.raises(InvalidArgument):
        asyncio.run(
            uploads.upload(
                UploadHeader("ws", "rf", sha, 0), _chunks(data[: len(data) - 1 - cut], chunk)
            )
        )
    assert len(_files(tmp_path)) == 1
    store.close()


def test_size_limit_is_enforced_while_streaming(tmp_path: Path, assets: Path) -> None:
    data = (assets / "models" / "rf_model.onnx").read_bytes()
    _, _, uploads = _uploads(tmp_path, limit=100_000)
    header = UploadHeader("ws", "rf", hashlib.sha256(data).hexdigest(), 0)
    with pytest.raises(LimitExceeded, match="100000-byte limit"):
        asyncio.run(uploads.upload(header, _chunks(data, 65536)))
    assert _files(tmp_path) == []
