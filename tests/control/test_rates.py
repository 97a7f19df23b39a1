"""Live requests/s and latency per version: the arithmetic on heartbeat counts, and the whole
path from an engine's real request counters (its data plane, its link's heartbeat) to the
control plane's fleet and the GetPipelineStatus message."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pytest

from hotswap.control import _convert
from hotswap.control.fleet import Fleet
from hotswap.control.rates import MIN_WINDOW, RateMeter, VersionCount, combined
from hotswap.engine.blob_cache import BlobCache
from hotswap.engine.dataplane import DataPlane, InferenceQueue, Ran
from hotswap.engine.errors import InvalidInput
from hotswap.engine.host import EngineHost
from hotswap.engine.link import ControlLink
from hotswap.engine.metrics import EngineMetrics
from hotswap.engine.runtime import LoadedPipeline, RuntimeOptions, encode_ipc
from hotswap.v1 import fleet_pb2 as f
from hotswap.v1 import types_pb2 as t


def _count(requests: int, errors: int = 0, seconds: float = 0.0, number: int = 1) -> VersionCount:
    return VersionCount("ws", "p", f"id-{number}", number, requests, errors, seconds)


def test_a_rate_is_the_difference_of_two_samples_over_their_window() -> None:
    meter = RateMeter()
    meter.sample(10.0, [_count(100, 2, 0.5)])
    assert meter.rates == {}  # one sample is a baseline, not a rate
    meter.sample(12.0, [_count(300, 6, 0.7)])
    rate = meter.rates["id-1"]
    assert (rate.requests, rate.errors) == (100.0, 2.0)
    # 0.2 s over 196 successful requests.
    assert rate.mean_latency_ms == pytest.approx(0.2 / 196 * 1000)


def test_worker_processes_are_summed_and_resets_start_a_new_baseline() -> None:
    meter = RateMeter()
    meter.sample(0.0, [_count(10), _count(5)])
    meter.sample(1.0, [_count(20), _count(15)])  # two processes of one engine: +20 in 1 s
    assert meter.rates["id-1"].requests == 20.0
    meter.sample(2.0, [_count(3)])  # counts went down: the version was loaded again
    assert "id-1" not in meter.rates
    meter.sample(3.0, [_count(13)])
    assert meter.rates["id-1"].requests == 10.0


def test_early_samples_wait_and_unlisted_versions_are_gone() -> None:
    meter = RateMeter()
    meter.sample(0.0, [_count(0), _count(0, number=2)])
    meter.sample(MIN_WINDOW / 10, [_count(5), _count(0, number=2)])  # too close: no rate yet
    assert meter.rates == {}
    meter.sample(1.0, [_count(10), _count(0, number=2)])
    assert meter.rates["id-1"].requests == 10.0 and meter.rates["id-2"].requests == 0.0
    meter.sample(2.0, [_count(10, number=2)])  # version 1 was released
    assert set(meter.rates) == {"id-2"}


def test_engines_combine_per_version_with_latency_weighted_by_requests() -> None:
    fast, slow = RateMeter(), RateMeter()
    fast.sample(0.0, [_count(0)])
    fast.sample(1.0, [_count(100, 0, 0.1)])
    slow.sample(0.0, [_count(0), _count(0, number=2)])
    slow.sample(1.0, [_count(100, 0, 1.0), _count(4, number=2)])
    two, one = combined([*fast.rates.values(), *slow.rates.values()])  # newest first
    assert (two.number, two.requests, two.engines) == (2, 4.0, 1)
    assert (one.number, one.requests, one.engines) == (1, 200.0, 2)
    assert one.mean_latency_ms == pytest.approx(1.1 / 200 * 1000)


# -- from an engine's real counters to the control plane's status --------------------------


def _table(rows: int) -> pa.Table:
    flat = pa.array(np.ones(rows * 18, np.float32))
    return pa.table({"tensor": pa.FixedSizeListArray.from_arrays(flat, 18)})


def _run(loaded: LoadedPipeline) -> Ran[bytes]:
    result = loaded.infer(_table(1))
    return Ran(encode_ipc(result), result, 1000, 1)


def _bad(loaded: LoadedPipeline) -> Ran[bytes]:
    raise InvalidInput("a wrong width")


async def test_an_engines_requests_reach_the_status_as_rates(tmp_path: Path, assets: Path) -> None:
    model = (assets / "models" / "rf_model.onnx").read_bytes()

    async def fetch(sha256: str, offset: int) -> AsyncIterator[bytes]:
        yield model[offset:]

    host = EngineHost(BlobCache(tmp_path / "cache", fetch), RuntimeOptions(), 0)
    metrics = EngineMetrics()
    # The channel is never dialled: the test takes the link's heartbeats itself.
    link = ControlLink(host, "127.0.0.1:1", "e1", "127.0.0.1:2", 1.0, metrics,
                       channel=grpc.aio.insecure_channel("127.0.0.1:1"))  # fmt: skip
    step = t.ModelVersion(name="rf", version="mv", sha256=hashlib.sha256(model).hexdigest())
    version = t.PipelineVersion(workspace="ws", pipeline="p", version_id="id-1", number=1,
                                steps=[step])  # fmt: skip
    link._dispatch(f.ControlMessage(desired=f.DesiredState(revision=1, pipelines=[version])))
    for task in list(link._tasks):
        await task
    with ThreadPoolExecutor(max_workers=1) as pool:
        plane = DataPlane(InferenceQueue(pool, 8), metrics, None, max_rows=10,
                          code_of=lambda exc: "INVALID_ARGUMENT")  # fmt: skip

        def lookup() -> LoadedPipeline:
            return host.lookup("ws", "p")

        fleet = Fleet(lost_after=5.0)
        connection = fleet.connect(f.Hello(name="e1", address="127.0.0.1:2", instance_id="a"))
        first = link.heartbeat()
        assert list(first.versions) == []  # nothing served yet: nothing to count
        await plane.serve(lookup, _run, nbytes=10)
        first = link.heartbeat()
        first.sent_ms = 1_000
        fleet.handle(connection, f.EngineMessage(heartbeat=first))
        for _ in range(30):
            await plane.serve(lookup, _run, nbytes=10)
        with pytest.raises(InvalidInput):
            await plane.serve(lookup, _bad, nbytes=10)
        second = link.heartbeat()
        [counts] = second.versions
        assert (counts.number, counts.requests, counts.errors) == (1, 32, 1)
        assert counts.seconds > 0
        second.sent_ms = 3_000  # two seconds after the first
        fleet.handle(connection, f.EngineMessage(heartbeat=second))
    [rate] = fleet.rates("ws", "p", ["e1"])
    assert (rate.requests, rate.errors) == (15.5, 0.5)
    assert rate.mean_latency_ms > 0
    assert fleet.rates("ws", "other", ["e1"]) == []
    # Only the engines assigned count: another engine's word on this pipeline is not taken.
    assert fleet.rates("ws", "p", ["e2"]) == []
    message = _convert.version_rate(rate)
    assert (message.number, message.requests_per_second, message.engines) == (1, 15.5, 1)
    host.close()
