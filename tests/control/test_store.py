"""The control plane's store and blob store, without grpc: real SQLite files, real disk."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from hotswap.control.blobs import BlobStore
from hotswap.control.domain import TensorSpec
from hotswap.control.errors import AlreadyExists, InvalidArgument, NotFound
from hotswap.control.store import MIGRATIONS, Store

SPEC_IN = (TensorSpec("float_input", "tensor(float)", (-1, 18)),)
SPEC_OUT = (TensorSpec("variable", "tensor(float)", (-1, 1)),)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "hotswap.db")
    s.create_workspace("ws")
    return s


def _add(store: Store, name: str, sha: str = "a" * 64) -> str:
    return store.add_model_version("ws", name, sha, 10, SPEC_IN, SPEC_OUT).version


def test_schema_is_migrated_in_wal_mode(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    assert store.schema_version == len(MIGRATIONS)
    store.close()
    raw = sqlite3.connect(tmp_path / "db")
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    Store(tmp_path / "db").close()
    raw = sqlite3.connect(tmp_path / "db")
    raw.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    raw.close()
    with pytest.raises(RuntimeError, match="upgrade hotswap"):
        Store(tmp_path / "db")


def test_uploading_a_name_again_makes_a_new_version(store: Store) -> None:
    first = _add(store, "rf", "a" * 64)
    second = _add(store, "rf", "b" * 64)
    versions = store.model_versions("ws", "rf")
    assert [v.version for v in versions] == [first, second]
    assert [v.sha256 for v in versions] == ["a" * 64, "b" * 64]
    [(latest, count)] = store.list_models("ws")
    assert (latest.version, count) == (second, 2)
    assert latest.inputs == SPEC_IN


def test_pipeline_versions_are_immutable_and_numbered(store: Store) -> None:
    rf_v1 = _add(store, "rf")
    store.create_pipeline("ws", "p")
    v1 = store.create_pipeline_version("ws", "p", [("rf", "")])
    _add(store, "rf", "c" * 64)  # a newer rf does not change version 1
    v2 = store.create_pipeline_version("ws", "p", [("rf", "")])
    assert (v1.number, v2.number) == (1, 2)
    assert store.pipeline_version("ws", "p", 1).steps[0].version == rf_v1
    assert store.pipeline_version("ws", "p", 0) == v2
    with pytest.raises(NotFound, match="no version 7"):
        store.pipeline_version("ws", "p", 7)
    with pytest.raises(InvalidArgument):
        store.create_pipeline_version("ws", "p", [])


def test_deployment_survives_reopen(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    store.create_workspace("ws")
    _add(store, "rf")
    store.create_pipeline("ws", "p")
    version = store.create_pipeline_version("ws", "p", [("rf", "")])
    store.set_deployment(version, 2, ["engine-1", "engine-2"])
    store.close()

    reopened = Store(tmp_path / "db")
    [deployment] = reopened.deployments()
    assert deployment.version == version
    assert (deployment.replicas, deployment.engines) == (2, ("engine-1", "engine-2"))
    assert reopened.delete_deployment("ws", "p") == deployment
    assert reopened.get_pipeline("ws", "p").deployment is None


def test_names_are_checked_and_unique(store: Store) -> None:
    with pytest.raises(AlreadyExists):
        store.create_workspace("ws")
    for bad in ["", "a/b", "../x", "x" * 101, "tab\tname", "-lead"]:
        with pytest.raises(InvalidArgument):
            store.create_pipeline("ws", bad)
    with pytest.raises(NotFound):
        store.create_pipeline("nope", "p")


def test_blob_writes_are_atomic_and_deduplicated(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    data = b"onnx bytes" * 1000
    sha = hashlib.sha256(data).hexdigest()
    for _ in range(2):
        with blobs.writer() as writer:
            writer.write(data[:5000])
            writer.write(data[5000:])
            assert writer.finish() == sha
            blobs.commit(writer, sha)
    assert blobs.path(sha).read_bytes() == data
    assert [p.name for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == [sha]

    # An abandoned write leaves nothing, and leftovers from a crash are swept at open.
    with blobs.writer() as writer:
        writer.write(b"partial")
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []
    (tmp_path / "blobs" / "tmp" / "crash.part").write_bytes(b"x")
    BlobStore(tmp_path / "blobs")
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []
    with pytest.raises(NotFound):
        blobs.path("f" * 64)


def test_the_swap_timeline_keeps_the_newest_records_per_pipeline(tmp_path: Path) -> None:
    from hotswap.control.timeline import Swap, SwapTimeline

    Store(tmp_path / "db").close()  # applies the migrations
    timeline = SwapTimeline(tmp_path / "db", keep=3)
    for i in range(5):
        swap = Swap(f"s{i}", "ws", "p", "deploy", i, i + 1, started_ms=1000 + i)
        swap.finish("ok")
        timeline.write(swap)
    other = Swap("o", "ws", "q", "deploy", 0, 1)
    other.finish("ok")
    timeline.write(other)
    assert [s.swap_id for s in timeline.list("ws", "p")] == ["s4", "s3", "s2"]
    assert [s.swap_id for s in timeline.list("ws", "q")] == ["o"]
    timeline.close()
