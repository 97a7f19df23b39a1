"""The engine's serving state without grpc: real ONNX Runtime sessions from a real blob cache."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import shutil
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from hotswap.engine.blob_cache import BlobCache, Fetcher
from hotswap.engine.errors import BlobError, PipelineNotServed, PrepareError
from hotswap.engine.host import EngineHost, ModelRef, VersionRef
from hotswap.engine.runtime import RuntimeOptions


async def _no_fetch(sha256: str, offset: int) -> AsyncIterator[bytes]:
    raise BlobError(f"blob {sha256} is not in the test cache")
    yield b""  # pragma: no cover - makes this an async generator


def _cache(
    tmp_path: Path, assets: Path, fetch: Fetcher = _no_fetch
) -> tuple[BlobCache, dict[str, str]]:
    """A blob cache pre-filled with the tutorial models, as if fetched earlier."""
    cache = BlobCache(tmp_path / "cache", fetch)
    shas = {}
    for model in ("rf", "gbr"):
        data = (assets / "models" / f"{model}_model.onnx").read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        cache.path(sha).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(assets / "models" / f"{model}_model.onnx", cache.path(sha))
        shas[model] = sha
    return cache, shas


def _ref(number: int, model: str, sha: str) -> VersionRef:
    return VersionRef("ws", "p", f"id-{number}", number, (ModelRef(model, f"{model}-v", sha),))


async def _serve(host: EngineHost, swap_id: str, ref: VersionRef) -> None:
    """Prepares and commits `ref`: it serves from then on."""
    await host.prepare(swap_id, ref)
    host.commit(swap_id)


def _batch() -> pa.Table:
    values = pa.array(np.ones(18, dtype=np.float32))
    return pa.table({"tensor": pa.FixedSizeListArray.from_arrays(values, 18)})


async def test_swap_keeps_in_flight_requests_on_their_version_then_frees_it(
    tmp_path: Path, assets: Path
) -> None:
    cache, shas = _cache(tmp_path, assets)
    host = EngineHost(cache, RuntimeOptions(), retain_seconds=0)
    await _serve(host, "s1", _ref(1, "rf", shas["rf"]))

    in_flight = host.lookup("ws", "p")  # a request that started before the swap
    old = weakref.ref(in_flight)
    await host.prepare("s2", _ref(2, "gbr", shas["gbr"]))
    assert host.commit("s2") < 1000  # µs: a reference swap

    assert host.lookup("ws", "p").spec.number == 2
    assert host.lookup("", "p").spec.number == 2  # workspace optional when unambiguous
    # (Plain locals: pytest's assertion rewriting would keep references to the pipeline.)
    number, rows = in_flight.spec.number, in_flight.infer(_batch()).num_rows
    assert (number, rows) == (1, 1)  # the old version still answers it
    assert await host.reap() == 0, "freed while a request still held it"
    del in_flight
    gc.collect()
    assert await host.reap() == 1
    assert old() is None, "the swapped-out version outlived its last request"


async def test_rollback_to_a_retained_version_is_a_pointer_flip(
    tmp_path: Path, assets: Path
) -> None:
    cache, shas = _cache(tmp_path, assets)
    host = EngineHost(cache, RuntimeOptions(), retain_seconds=60, retain_versions=1)
    await _serve(host, "s1", _ref(1, "rf", shas["rf"]))
    first = host.lookup("ws", "p")
    await _serve(host, "s2", _ref(2, "gbr", shas["gbr"]))
    prepared = await host.prepare("s3", _ref(1, "rf", shas["rf"]))
    assert prepared.reused
    host.commit("s3")
    assert host.lookup("ws", "p") is first
    # With retain_versions=1 only the version just swapped out is kept per pipeline.
    await _serve(host, "s4", _ref(3, "gbr", shas["gbr"]))
    assert len(host.loaded_versions()) == 2  # v3 active, v1 retained
    assert {p.spec.version_id for p in host.loaded_versions()} == {"id-3", "id-1"}


async def test_retain_versions_bounds_what_stays_loaded(tmp_path: Path, assets: Path) -> None:
    cache, shas = _cache(tmp_path, assets)
    host = EngineHost(cache, RuntimeOptions(), retain_seconds=60, retain_versions=2)
    for number in range(1, 6):
        model = "rf" if number % 2 else "gbr"
        await host.prepare(f"s{number}", _ref(number, model, shas[model]))
        host.commit(f"s{number}")
    numbers = sorted(p.spec.number for p in host.loaded_versions())
    assert numbers == [3, 4, 5]  # active v5, the last two swapped out
    assert (await host.prepare("back", _ref(3, "rf", shas["rf"]))).reused


async def test_abort_and_failures_leave_the_active_version(tmp_path: Path, assets: Path) -> None:
    cache, shas = _cache(tmp_path, assets)
    host = EngineHost(cache, RuntimeOptions(), retain_seconds=0)
    await _serve(host, "s1", _ref(1, "rf", shas["rf"]))

    await host.prepare("s2", _ref(2, "gbr", shas["gbr"]))
    host.abort("s2")
    with pytest.raises(PrepareError, match="not prepared"):
        host.commit("s2")
    with pytest.raises(BlobError):
        await host.prepare("s3", _ref(3, "missing", "0" * 64))
    assert host.lookup("ws", "p").spec.number == 1


async def test_reconcile_loads_desired_and_releases_the_rest(tmp_path: Path, assets: Path) -> None:
    cache, shas = _cache(tmp_path, assets)
    host = EngineHost(cache, RuntimeOptions(), retain_seconds=0)
    await host.reconcile([_ref(4, "gbr", shas["gbr"])])
    assert [(s.key, s.state, s.active.spec.number) for s in host.states() if s.active] == [
        ("ws/p", "Running", 4)
    ]
    await host.reconcile([_ref(5, "missing", "0" * 64)])
    [state] = host.states()
    assert state.state == "Error" and "0000" in state.error
    assert host.lookup("ws", "p").spec.number == 4  # still serving what it had
    await host.reconcile([])
    assert host.states() == []
    with pytest.raises(PipelineNotServed):
        host.lookup("ws", "p")


async def test_a_corrupt_cached_blob_is_never_served(tmp_path: Path, assets: Path) -> None:
    cache, shas = _cache(tmp_path, assets)
    cache.path(shas["rf"]).write_bytes(b"corrupted on disk")
    host = EngineHost(cache, RuntimeOptions(), retain_seconds=0)
    with pytest.raises(BlobError, match="not in the test cache"):
        await host.prepare("s1", _ref(1, "rf", shas["rf"]))
    assert not cache.path(shas["rf"]).exists()


async def test_a_new_version_shares_the_sessions_of_models_already_loaded(
    tmp_path: Path, assets: Path
) -> None:
    cache, shas = _cache(tmp_path, assets)
    host = EngineHost(cache, RuntimeOptions(), retain_seconds=60)
    await _serve(host, "s1", _ref(1, "rf", shas["rf"]))
    await _serve(host, "s2", _ref(2, "gbr", shas["gbr"]))
    rf_session = host.loaded_versions()[1].sessions_by_sha()[shas["rf"]]
    # Version 3 runs rf again, with a new version id: rf's session (held by retained v1) is
    # shared, not built, nor warmed up again (v1 ran the same steps).
    prepared = await host.prepare("s3", _ref(3, "rf", shas["rf"]))
    assert (prepared.reused, prepared.load_ms, prepared.warmup_ms) == (True, 0.0, 0.0)
    host.commit("s3")
    v3 = host.lookup("ws", "p")
    assert v3.spec.number == 3
    assert v3.sessions_by_sha()[shas["rf"]] is rf_session
    assert v3.infer(_batch()).num_rows == 1


async def test_a_version_with_the_same_models_in_order_shares_the_warm_sessions(
    tmp_path: Path, assets: Path
) -> None:
    cache, shas = _cache(tmp_path, assets)
    host = EngineHost(cache, RuntimeOptions(), retain_seconds=300)
    first = await host.prepare("s1", _ref(1, "rf", shas["rf"]))
    assert not first.reused
    host.commit("s1")
    warm = host.lookup("ws", "p")
    again = await host.prepare("s2", _ref(2, "rf", shas["rf"]))  # a new version, same model
    assert (again.reused, again.load_ms, again.warmup_ms) == (True, 0.0, 0.0)
    host.commit("s2")
    served = host.lookup("ws", "p")
    assert served.spec.number == 2
    assert served.row_ms == warm.row_ms < 1000  # still fast enough to run inline
    assert served.sessions_by_sha() == host.loaded_versions()[1].sessions_by_sha()
    # A different model is built and warmed up as ever.
    other = await host.prepare("s3", _ref(3, "gbr", shas["gbr"]))
    assert not other.reused and other.warmup_ms > 0
    out = served.infer(_batch())
    assert out.num_rows == 1


async def test_a_scheduled_switch_serves_the_new_version_from_its_instant(
    tmp_path: Path, assets: Path
) -> None:
    cache, shas = _cache(tmp_path, assets)
    host = EngineHost(cache, RuntimeOptions(), retain_seconds=60)
    await _serve(host, "s1", _ref(1, "rf", shas["rf"]))
    await host.prepare("s2", _ref(2, "gbr", shas["gbr"]))
    now_us = time.time_ns() // 1000
    host.schedule("s2", now_us + 3_600_000_000)  # an hour ahead: not yet
    assert host.lookup("ws", "p").spec.number == 1
    host.abort("s2")  # an abort drops the schedule with the prepared version
    assert host.lookup("ws", "p").spec.number == 1
    with pytest.raises(PrepareError):
        host.commit("s2")

    await host.prepare("s3", _ref(3, "gbr", shas["gbr"]))
    host.schedule("s3", now_us)  # already due: the next lookup switches, before any commit
    assert host.lookup("ws", "p").spec.number == 3
    assert host.switched_at_us == now_us  # from the instant, not from when a request came
    assert host.commit("s3") < 1000  # the commit finds it done, and answers as usual
    assert host.lookup("ws", "p").spec.number == 3

    # A new control-plane stream drops what was only prepared, but a scheduled switch is
    # past its commit point: it happens at once.
    await host.prepare("s4", _ref(4, "rf", shas["rf"]))
    host.schedule("s4", time.time_ns() // 1000 + 3_600_000_000)
    host.abort_all()
    assert host.lookup("ws", "p").spec.number == 4


async def test_an_older_desired_state_never_undoes_a_newer_swap(
    tmp_path: Path, assets: Path
) -> None:
    """A desired state applied slowly (here: another pipeline's model still downloading)
    must not restore a version that a swap replaced after the state was sent."""
    gbr = (assets / "models" / "gbr_model.onnx").read_bytes()
    release = asyncio.Event()

    async def slow_fetch(sha256: str, offset: int) -> AsyncIterator[bytes]:
        await release.wait()
        yield gbr[offset:]

    cache, shas = _cache(tmp_path, assets, slow_fetch)
    cache.path(shas["gbr"]).unlink()  # q's model must be fetched, slowly
    host = EngineHost(cache, RuntimeOptions(), retain_seconds=60)
    await _serve(host, "s1", _ref(1, "rf", shas["rf"]))
    q = VersionRef("ws", "q", "q-1", 1, (ModelRef("gbr", "gbr-v", shas["gbr"]),))
    # The state sent before the swap below: q (downloading), then p still at version 1.
    seen = host.swaps_seen()
    # It cannot reach p before q's download ends, which waits for `release`.
    applying = asyncio.ensure_future(host.reconcile([q, _ref(1, "rf", shas["rf"])], seen))
    await _serve(host, "s2", _ref(2, "rf", shas["rf"]))  # the swap: p is at version 2 now
    release.set()
    await asyncio.wait_for(applying, 30)
    assert host.lookup("ws", "p").spec.number == 2
    assert host.lookup("ws", "q").spec.number == 1
