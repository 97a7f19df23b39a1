"""A long run of swaps cannot grow the engine's metrics without bound."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import generate_latest

from hotswap.engine.metrics import KEEP_VERSIONS, EngineMetrics
from hotswap.engine.runtime import LoadedPipeline, PipelineSpec, RuntimeOptions, StepSpec


def test_only_the_newest_versions_keep_series(assets: Path) -> None:
    metrics = EngineMetrics()
    model = assets / "models" / "rf_model.onnx"
    for number in range(1, 21):
        spec = PipelineSpec("ws", "p", f"id-{number}", number, (StepSpec("rf", "v", "s", model),))
        bound = metrics.bind(LoadedPipeline.build(spec, RuntimeOptions()))
        bound.served(0.001, 1)
        metrics.failed(bound, "INVALID_ARGUMENT")
    text = generate_latest(metrics.registry).decode()
    versions = {int(v) for v in re.findall(r'version="(\d+)"', text)}
    assert versions == set(range(21 - KEEP_VERSIONS, 21))
    assert 'code="INVALID_ARGUMENT",pipeline="p",version="13"' in text
