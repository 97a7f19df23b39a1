"""The champion's latency with and without two shadow challengers, in one run.

One engine serves the bench pipeline as rf alone, then (a hot swap) as a shadow deploy of rf
with gbr and xgb as challengers, and back, measuring the same 1-row and 1,000-row cells on each
in turn, so machine noise hits both alike. The challengers run in the inference log's writer
thread, off the request path; the engine's metrics say how many of them ran, so the table
shows the shadows kept up and were not skipped.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import _cells, _peers
from hotswap.v1 import control_pb2 as c
from hotswap.v1 import types_pb2 as t

CELLS = ((1, 1), (1, 4), (1000, 4))


def _deploy(stub: Any, shadows: bool) -> int:
    request = c.CreatePipelineVersionRequest(
        workspace=_cells.WS, pipeline=_cells.PIPELINE, steps=[c.StepRef(model="rf")]
    )
    if shadows:
        request.splits.append(
            c.SplitRef(
                step=0,
                kind=t.StepSplit.KIND_SHADOW,
                models=[c.StepRef(model=m) for m in ("rf", "gbr", "xgb")],
            )
        )
    version = stub.CreatePipelineVersion(request)
    stub.Deploy(
        c.DeployRequest(workspace=_cells.WS, pipeline=_cells.PIPELINE, version=version.number),
        timeout=300,
    )
    return int(version.number)


def _shadow_runs(metrics: str) -> tuple[dict[str, float], float]:
    """Requests each model ran for, and log rows dropped, from the engine's Prometheus text."""
    text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5).read().decode()
    runs: dict[str, float] = {}
    dropped = 0.0
    for line in text.splitlines():
        if line.startswith("hotswap_engine_model_requests_total{"):
            model = line.split('model="', 1)[1].split('"', 1)[0]
            runs[model] = runs.get(model, 0.0) + float(line.rsplit(" ", 1)[1])
        elif line.startswith("hotswap_engine_inference_log_dropped_rows_total "):
            dropped = float(line.rsplit(" ", 1)[1])
    return runs, dropped


def phase(
    models: dict[str, Path], tmp: Path, tables: dict[int, Any], seconds: float, log: Any
) -> dict[str, Any]:
    cells: list[dict[str, Any]] = []
    trio = {m: models[m] for m in ("rf", "gbr", "xgb")}
    with _cells.service(tmp / "shadow", 1, trio) as (stack, engine):
        stub = _cells.control(stack)
        pid = stack.processes["engine-1"].pid
        for _round in range(2):
            for shadows in (False, True):
                _deploy(stub, shadows)
                for rows, concurrency in CELLS:
                    log(f"shadows={shadows} rows={rows} concurrency={concurrency}")
                    before, began = _peers.cpu_seconds(pid), time.monotonic()
                    got = _cells.cell(engine, False, tables[rows], concurrency, seconds)
                    busy = _peers.cpu_seconds(pid) - before
                    served = got["requests_s"] * (time.monotonic() - began)
                    cells.append({"shadows": shadows, "cpu_us": busy / max(served, 1) * 1e6, **got})
        time.sleep(2.5)  # the log's last flush runs the last requests' challengers
        runs, dropped = _shadow_runs(stack.metrics_address("engine-1"))
    # The champion (rf) is counted as the shadow step's first model: the requests the
    # shadowed versions answered, each of which owes one run of each challenger.
    return {
        "cells": cells,
        "challenger_runs": runs,
        "champion_requests": runs.get("rf", 0.0),
        "log_dropped_rows": dropped,
    }


def summary(result: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## The champion with and without two shadows (rf; challengers gbr and xgb)",
        "",
        "Alternated twice on one engine; the challengers run in the log writer, off the "
        "request path. Ratios are shadowed / plain, of the better of the two rounds.",
        "",
        "| rows | concurrency | plain p50 ms | shadowed p50 ms | plain p99 ms | shadowed p99 ms "
        "| req/s ratio | p50 ratio | engine CPU µs/req plain → shadowed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rows, concurrency in CELLS:

        def best(shadows: bool, key: str, low: bool, r: int = rows, k: int = concurrency) -> Any:
            found = [c for c in result["cells"] if (c["rows"], c["concurrency"],
                                                    c["shadows"]) == (r, k, shadows)]  # fmt: skip
            return (min if low else max)(c[key] for c in found)

        plain_p50, shadow_p50 = best(False, "p50_ms", True), best(True, "p50_ms", True)
        lines.append(
            f"| {rows} | {concurrency} | {plain_p50:.3f} | {shadow_p50:.3f} "
            f"| {best(False, 'p99_ms', True):.3f} | {best(True, 'p99_ms', True):.3f} "
            f"| {best(True, 'requests_s', False) / best(False, 'requests_s', False):.2f} "
            f"| {shadow_p50 / plain_p50:.2f} "
            f"| {best(False, 'cpu_us', True):.0f} → {best(True, 'cpu_us', True):.0f} |"
        )
    runs = result["challenger_runs"]
    lines += [
        "",
        f"Challenger runs counted by the engine: gbr {runs.get('gbr', 0):,.0f}, xgb "
        f"{runs.get('xgb', 0):,.0f}, for the {result['champion_requests']:,.0f} requests the "
        "shadowed versions answered (each owes one run of each challenger; the engine's "
        "versions still loaded are counted). Rows the inference log dropped (its memory "
        f"bound; their shadows never run): {result.get('log_dropped_rows', 0):,.0f}.",
    ]
    return lines


def main() -> int:
    """`make bench-traffic`: this phase alone, written to bench/results/<date>-<host>-traffic."""
    import tempfile

    from bench import run

    with tempfile.TemporaryDirectory(prefix="hotswap-bench-traffic-") as scratch:
        tmp = Path(scratch)
        tables = {n: run.rows_table(n) for n in (1, 1000)}
        result = phase(run.tutorial_models(tmp), tmp, tables, 4.0, run.log)
    run.write_phase("traffic", "shadow deploys", result, summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
