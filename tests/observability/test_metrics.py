"""Prometheus endpoints of both services, scraped during a swap under load."""

from __future__ import annotations

import threading
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import hotswap
from hotswap.clients._stack import LocalStack
from tests.observability.conftest import poll, setup_pipeline, tensor_table, xtest


def scrape(address: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by name: [(labels, value)]."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    return sum(
        value
        for got, value in samples.get(name, [])
        if all(got.get(k) == v for k, v in labels.items())
    )


def test_counters_move_during_a_swap_under_load(tmp_path: Path, assets: Path) -> None:
    x = xtest(assets)
    with (
        LocalStack(tmp_path / "s", engines=1) as stack,
        hotswap.Client(stack.control_address) as wl,
    ):
        pipeline, models = setup_pipeline(wl, assets)
        engine = stack.metrics_address("engine-1")
        control = stack.metrics_address("control")
        sent: Counter[int] = Counter()
        rows: Counter[int] = Counter()
        stop = threading.Event()
        errors: list[BaseException] = []

        def load() -> None:
            i = 0
            try:
                with hotswap.Client(stack.control_address) as own:
                    own.set_current_workspace(wl.get_current_workspace())
                    mine = own.get_pipeline("housing")
                    while not stop.is_set():
                        n = 1 + i % 3
                        mine.infer(tensor_table(x[i : i + n]))
                        served = mine.last_served()
                        assert served is not None
                        sent[served.pipeline_version] += 1
                        rows[served.pipeline_version] += n
                        i += 1
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=load)
        worker.start()
        try:
            poll(lambda: sent[1] >= 20)
            pipeline.replace_with_model_step(0, models["gbr"]).deploy()
            poll(lambda: sent[2] >= 20)
        finally:
            stop.set()
            worker.join(timeout=30)
        assert not errors

        # A bad request: counted with its status code.
        with pytest.raises(hotswap.InvalidInputError):
            pipeline.infer(tensor_table(x[:1, :5]))

        e = scrape(engine)
        ws = wl.get_current_workspace().name()
        name = "hotswap_engine_requests_total"
        for version in (1, 2):
            ok = total(e, name, workspace=ws, pipeline="housing", version=str(version), code="OK")
            assert ok == sent[version], (version, ok, sent)
            assert total(e, "hotswap_engine_rows_total", version=str(version)) == rows[version]
            count = total(e, "hotswap_engine_request_duration_seconds_count", version=str(version))
            assert count == sent[version]
        assert total(e, name, version="2", code="INVALID_ARGUMENT") == 1
        assert total(e, "hotswap_engine_requests_in_flight") == 0
        assert total(e, "hotswap_engine_sessions_loaded") >= 1
        assert total(e, "hotswap_engine_blob_cache_bytes") > 0
        for stage in ("fetch", "build", "warmup", "commit"):
            assert total(e, "hotswap_engine_swap_stage_seconds_count", stage=stage) >= 1, stage
        assert total(e, "hotswap_engine_swaps_total", result="committed") >= 1
        assert total(e, "hotswap_engine_inference_log_rows_total") == rows[1] + rows[2]

        c = scrape(control)
        assert total(c, "hotswap_control_engines_connected") == 1
        assert total(c, "hotswap_control_deploys_total", outcome="ok") == 2
        assert total(c, "hotswap_control_deploy_duration_seconds_count", outcome="ok") == 2
        assert total(c, "hotswap_control_swap_phase_seconds_count", phase="prepare") == 2
        assert total(c, "hotswap_control_swap_engine_stage_seconds_count", stage="build") == 2
        assert total(c, "hotswap_control_engine_connects_total") == 1


def test_metrics_off_by_default(tmp_path: Path) -> None:
    from hotswap.control.settings import Settings as ControlSettings
    from hotswap.engine.settings import Settings as EngineSettings

    assert ControlSettings.from_args([], {}).metrics_port == -1
    assert EngineSettings.from_args([], {}).metrics_port == -1
    assert EngineSettings.from_args(["--metrics-port", "0"], {}).metrics_port == 0
    assert not EngineSettings.from_args([], {"HOTSWAP_INFERENCE_LOG": "off"}).inference_log
