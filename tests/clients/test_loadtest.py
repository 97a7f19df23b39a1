"""The load-test harness: histogram accuracy and merging, and short live runs on a real stack."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hotswap.clients._stack import LocalStack
from hotswap.clients.loadtest import Histogram, main
from hotswap.clients.loadtest._histogram import SUB
from hotswap.v1 import control_pb2 as c
from tests._terminal import in_terminal
from tests.e2e import _api

PRECISION = 1.0 / SUB  # a bucket's width relative to its value


def _filled(values: np.ndarray) -> Histogram:
    hist = Histogram()
    for v in values:
        hist.record(int(v))
    return hist


def test_percentiles_match_numpy_within_bucket_precision() -> None:
    rng = np.random.default_rng(7)
    # An odd count keeps every rank off exact boundaries, where float rounding decides.
    values = rng.lognormal(mean=7, sigma=1.5, size=20_001).astype(np.int64) + 1
    hist = _filled(values)
    for q in (50, 90, 99, 99.9):
        exact = float(np.percentile(values, q, method="inverted_cdf"))
        assert hist.percentile(q) == pytest.approx(exact, rel=PRECISION, abs=1)
    assert hist.max == values.max()
    assert hist.min == values.min()
    assert hist.total == len(values)
    assert len(hist.counts) < 2_000  # bounded by buckets, not samples


def test_merge_equals_one_histogram_of_both() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.integers(1, 10**6, 5_000), rng.integers(50, 10**4, 3_000)
    merged = _filled(a).merge(Histogram.from_dict(_filled(b).to_dict()))
    both = _filled(np.concatenate([a, b]))
    assert merged.counts == both.counts
    assert (merged.total, merged.max, merged.min, merged.sum) == (
        both.total,
        both.max,
        both.min,
        both.sum,
    )
    assert merged.percentile(99) == both.percentile(99)


@pytest.fixture
def served(tmp_path: Path, assets: Path) -> Iterator[LocalStack]:
    """A stack serving `housing` with rf; gbr and xgb uploaded too."""
    with LocalStack(tmp_path / "stack", engines=1) as stack:
        stub = _api.control(stack.control_address)
        stub.CreateWorkspace(c.CreateWorkspaceRequest(name=_api.WS))
        for m in ("rf", "gbr", "xgb"):
            _api.upload(stub, m, (assets / "models" / f"{m}_model.onnx").read_bytes())
        stub.CreatePipeline(c.CreatePipelineRequest(workspace=_api.WS, name="housing"))
        _api.deploy(stub, "housing", _api.new_version(stub, "housing", "rf").number)
        yield stack


def _run(stack: LocalStack, tmp_path: Path, *extra: str) -> dict[str, object]:
    out = tmp_path / "report.json"
    code = main(
        [
            "housing",
            "--address",
            stack.control_address,
            "--workspace",
            _api.WS,
            "--report",
            str(out),
            "--quiet",
            *extra,
        ]
    )
    report: dict[str, object] = json.loads(out.read_text())
    assert code == 0, report["errors"]
    return report


def test_live_run_and_swaps(
    served: LocalStack, tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _run(
        served,
        tmp_path,
        "--concurrency",
        "4",
        "--requests",
        "400",
        "--input",
        str(assets / "data" / "xtest-1k.arrow"),
        "--batch-rows",
        "10",
    )
    assert report["errors"] == {}
    assert report["ok"] == report["requests"] == 400
    latency = report["latency_ms"]
    assert isinstance(latency, dict)
    assert set(latency) >= {"p50", "p90", "p99", "p99.9", "max"}
    assert 0 < latency["p50"] <= latency["p99"] <= latency["max"]
    throughput = report["throughput"]
    assert isinstance(throughput, dict)
    assert throughput["rows_s"] == pytest.approx(10 * throughput["requests_s"])
    assert sum(report["versions"].values()) == 400  # type: ignore[attr-defined]
    assert {"harness", "timeline", "histogram_us", "swaps"} <= set(report)

    # Requests keep flowing while swaps happen; the run ends after the last swap's window.
    swapped = _run(
        served,
        tmp_path,
        "--concurrency",
        "2",
        "--swap-every",
        "0.3",
        "--models",
        "gbr,xgb",
        "--swaps",
        "2",
    )
    swaps = swapped["swaps"]
    assert isinstance(swaps, list) and len(swaps) == 2
    assert all(not s["error"] and s["deploy_ms"] > 0 for s in swaps)
    assert [s["model"] for s in swaps] == ["gbr", "xgb"]
    versions: dict[str, int] = swapped["versions"]  # type: ignore[assignment]
    assert {str(s["version"]) for s in swaps} <= set(versions)
    assert sum(versions.values()) == swapped["ok"] == swapped["requests"]
    assert all(s["served"] == versions[str(s["version"])] for s in swaps)
    assert all(s["window"]["count"] > 0 for s in swaps)
    # The run put the pipeline back where it found it, and said so.
    stub = _api.control(served.control_address)
    found = stub.GetPipeline(c.GetPipelineRequest(workspace=_api.WS, name="housing"))
    assert found.deployed.number == 1 and found.version_count == 3
    assert "back on version 1" in capsys.readouterr().err


def test_loadtest_rows_are_marked_in_the_inference_log(
    served: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hotswap

    monkeypatch.setenv("HOTSWAP_ADDRESS", served.control_address)
    monkeypatch.setenv("HOTSWAP_WORKSPACE", _api.WS)
    assert main(["housing", "--requests", "7", "--quiet", "--report", str(tmp_path / "r")]) == 0
    client = hotswap.Client()
    client.set_current_workspace(_api.WS)
    pipeline = client.get_pipeline("housing")
    pipeline.infer(_api.tensor_table(np.ones((1, 18), np.float32)))

    def sources() -> list[str]:
        logs: Any = pipeline.logs(limit=100, dataset=["*"], arrow=True)
        return sorted(logs.column("metadata.source").to_pylist())

    _api.until(lambda: len(sources()) == 8, "8 logged rows")
    assert sources() == [""] + ["loadtest"] * 7


def test_loadtest_errors_are_sentences(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Nothing listens on port 1 of loopback: the connection is refused at once.
    assert main(["housing", "--address", "127.0.0.1:1", "--requests", "1"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the control plane at 127.0.0.1:1" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as usage:
        main(["housing", "--swap-every", "1", "--requests", "1"])
    assert usage.value.code == 2
    assert "--swap-every needs --models" in capsys.readouterr().err


def test_progress_shows_on_a_terminal_and_nowhere_else(served: LocalStack, tmp_path: Path) -> None:
    hotswap_cli = str(Path(sys.executable).parent / "hotswap")
    command = [hotswap_cli, "loadtest", "housing", "--requests", "1500"]
    command += ["--address", served.control_address, "--workspace", _api.WS]
    code, shown = in_terminal(command)
    assert code == 0, shown
    assert "load: " in shown and "/1500" in shown and "req/s" in shown  # tqdm's bar
    assert "1500/1500" in shown
    piped = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0, piped.stderr
    assert "load: " not in piped.stderr and "req/s]" not in piped.stderr
