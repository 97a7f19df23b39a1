"""The one request path, without grpc: the inline-or-thread choice, the queue bound, metrics
for successes and failures by code, and the inference log (with its source)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from hotswap.engine.dataplane import DataPlane, InferenceQueue, Ran
from hotswap.engine.errors import InvalidInput, Overloaded
from hotswap.engine.inference_log import InferenceLog, LogSettings
from hotswap.engine.metrics import EngineMetrics
from hotswap.engine.runtime import (
    LoadedPipeline,
    PipelineSpec,
    RuntimeOptions,
    StepSpec,
    encode_ipc,
)


@pytest.fixture
def loaded(assets: Path) -> LoadedPipeline:
    step = StepSpec("rf", "mv", "sha", assets / "models" / "rf_model.onnx")
    return LoadedPipeline.build(PipelineSpec("ws", "p", "id-1", 1, (step,)), RuntimeOptions())


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="infer") as pool:
        yield pool


def _table(rows: int) -> pa.Table:
    flat = pa.array(np.ones(rows * 18, np.float32))
    return pa.table({"tensor": pa.FixedSizeListArray.from_arrays(flat, 18)})


def _run(where: list[str]):
    def run(loaded: LoadedPipeline) -> Ran[bytes]:
        where.append(threading.current_thread().name)
        result = loaded.infer(_table(1))
        return Ran(encode_ipc(result), result, 1000, 10)

    return run


async def test_small_requests_on_fast_models_run_inline_others_on_a_thread(
    loaded: LoadedPipeline, executor: ThreadPoolExecutor
) -> None:
    assert loaded.row_ms < 0.5  # the rf model is fast: the inline path applies
    plane = DataPlane(InferenceQueue(executor, 8), EngineMetrics(), None, max_rows=10,
                      inline_bytes=100)  # fmt: skip
    where: list[str] = []
    await plane.serve(lambda: loaded, _run(where), nbytes=100)
    await plane.serve(lambda: loaded, _run(where), nbytes=101)
    assert where[0] == threading.current_thread().name and where[1].startswith("infer")


async def test_outcomes_are_counted_and_logged(
    loaded: LoadedPipeline, executor: ThreadPoolExecutor, tmp_path: Path
) -> None:
    metrics = EngineMetrics()
    log = InferenceLog(LogSettings(tmp_path / "logs"), "e")
    plane = DataPlane(InferenceQueue(executor, 8), metrics, log, max_rows=10,
                      code_of=lambda exc: "INVALID_ARGUMENT")  # fmt: skip
    served = await plane.serve(lambda: loaded, _run([]), nbytes=10, source="loadtest")
    assert served.loaded is loaded and served.elapsed_ns == 1000

    def bad(loaded: LoadedPipeline) -> Ran[bytes]:
        raise InvalidInput("a wrong width")

    with pytest.raises(InvalidInput):
        await plane.serve(lambda: loaded, bad, nbytes=10)
    text = metrics.registry.get_sample_value
    labels = {"workspace": "ws", "pipeline": "p", "version": "1"}
    assert text("hotswap_engine_requests_total", {**labels, "code": "OK"}) == 1
    assert text("hotswap_engine_requests_total", {**labels, "code": "INVALID_ARGUMENT"}) == 1
    assert text("hotswap_engine_requests_in_flight") == 0
    rows = log.query("ws", "p", 10)
    assert rows is not None and rows.column("metadata.source").to_pylist() == ["loadtest"]
    log.close()


async def test_a_full_queue_refuses_and_counts_it(
    loaded: LoadedPipeline, executor: ThreadPoolExecutor
) -> None:
    metrics = EngineMetrics()
    plane = DataPlane(InferenceQueue(executor, 0), metrics, None, max_rows=10,
                      code_of=lambda exc: "RESOURCE_EXHAUSTED")  # fmt: skip
    with pytest.raises(Overloaded):
        await plane.serve(lambda: loaded, _run([]), nbytes=10)
    labels = {"workspace": "ws", "pipeline": "p", "version": "1", "code": "RESOURCE_EXHAUSTED"}
    assert metrics.registry.get_sample_value("hotswap_engine_requests_total", labels) == 1
