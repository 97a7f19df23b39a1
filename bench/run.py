"""`make bench`: the floor, the bare reference and hotswap side by side, in one run.

    python bench/run.py [--quick] [--out bench/results]

Phases: (1) in-process ONNX Runtime, (2) the bare reference server and (3) the service on
the same batches; (4) 50 swaps under load; (5) a soak of many swaps with the engine's RSS
sampled; (6) deploy time and serving pause for ~1/10/100 MB models; (7) a 16-engine
fleet's deploy time and cutover spread, light and saturated (bench/_fleet.py); the champion
with and without two shadow challengers (bench/_shadow.py); HTTP next to gRPC on one engine
(bench/_http.py). Writes
<out>/<date>-<host>.json and .md (see bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `bench.*` when run as a script

import pyarrow as pa  # noqa: E402

from bench import _auth, _cells, _fleet, _http, _models, _peers, _shadow, _summary  # noqa: E402
from hotswap.clients.loadtest import SwapPlan, _input  # noqa: E402

SHARED_MODELS = ROOT.parent / "shared" / "assets" / "models"
SHARED_DATA = ROOT.parent / "shared" / "assets" / "data" / "xtest-1k.arrow"
TRIO = ("rf", "gbr", "xgb")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def tutorial_models(tmp: Path) -> dict[str, Path]:
    if all((SHARED_MODELS / f"{m}_model.onnx").is_file() for m in TRIO):
        return {m: SHARED_MODELS / f"{m}_model.onnx" for m in TRIO}
    out = tmp / "models"
    import subprocess

    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "housing" / "make_models.py"), "--out", str(out)],
        check=True,
    )
    return {m: out / f"{m}_model.onnx" for m in TRIO}


def write_phase(suffix: str, title: str, result: dict[str, Any], lines: list[str]) -> None:
    """A phase run alone (`make bench-auth`, `make bench-traffic`): its figures and summary
    in bench/results/<date>-<host>-<suffix>.json/.md, the summary on stdout."""
    out = ROOT / "bench" / "results"
    stem = f"{time.strftime('%Y-%m-%d')}-{socket.gethostname()}-{suffix}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    text = "\n".join([f"# hotswap bench: {title}", *lines, ""])
    (out / f"{stem}.md").write_text(text)
    print(text)


def rows_table(rows: int) -> pa.Table:
    base = (
        pa.ipc.open_file(SHARED_DATA).read_all()
        if SHARED_DATA.is_file()
        else _input.generated(18, 1000)
    )
    return _input.batch(base, rows)


def serving_phases(
    results: dict[str, Any], models: dict[str, Path], tmp: Path, seconds: float
) -> None:
    """Phases 1-3: floor, bare reference and service for both ORT thread settings."""
    tables = {n: rows_table(n) for n in (1, 10, 100, 1000, 10000)}
    rf = models["rf"]
    results["floor"] = [
        {
            "threads": t,
            "rows": n,
            **_cells.floor(rf, _cells.tensor(tables[n]), t, min(seconds, 1.0)),
        }
        for t in (1, 0)
        for n in (1, 1000)
    ]
    grid = [(n, c, 1) for n in (1, 1000) for c in (1, 4, 16)] + [(1, 16, 2)]
    sweep = [(n, 4, 1) for n in (1, 10, 100, 1000, 10000)]
    # The bare reference runs both ways a minimal server might: ORT on a thread pool (like
    # the engine) and inline on the event loop (cheaper for 1 row, serial for big batches);
    # each comparison takes the better of the two. All three servers are up at once and each
    # cell is measured on them back to back, so load from anything else on the machine hits
    # reference and service alike.
    results["bare"], results["service"] = [], []
    for threads in (1, 0):
        with (
            _cells.bare_server(rf, threads, tmp) as pool,
            _cells.bare_server(rf, threads, tmp, inline=True) as inline,
            _cells.service_address(tmp, threads, {"rf": rf}) as engine,
        ):
            todo = grid + ([c for c in sweep if c not in grid] if threads == 1 else [])
            for n, c, p in todo:
                log(f"threads={threads} rows={n} concurrency={c} processes={p}")
                for kind, address, is_inline in (
                    ("bare", pool, False),
                    ("bare", inline, True),
                    ("service", engine, False),
                ):
                    got = _cells.cell(address, kind == "bare", tables[n], c, seconds, p)
                    results[kind].append({"threads": threads, "inline": is_inline, **got})


def logging_phase(
    results: dict[str, Any], models: dict[str, Path], tmp: Path, seconds: float
) -> None:
    """The cost of the inference log: the same cells with it on and off, back to back."""
    rf = {"rf": models["rf"]}
    results["logging"] = []
    with (
        _cells.service_address(tmp / "log-on", 1, rf) as on,
        _cells.service_address(tmp / "log-off", 1, rf, ("--no-inference-log",)) as off,
    ):
        for rows in (1, 1000):
            log(f"inference log on/off, rows={rows} concurrency=4")
            for state, address in (("on", on), ("off", off)):
                got = _cells.cell(address, False, rows_table(rows), 4, seconds)
                results["logging"].append({"log": state, **got})


def processes_phase(
    results: dict[str, Any], models: dict[str, Path], tmp: Path, seconds: float
) -> None:
    """One engine on 1 and on 2 processes (`--processes`), loaded by 2 client processes with
    4 connections each (the kernel hands each connection to one engine process)."""
    results["processes"] = []
    for processes in (1, 2):
        args = ("--processes", str(processes))
        rf = {"rf": models["rf"]}
        with _cells.service(tmp / f"procs-{processes}", 1, rf, args) as (stack, at):
            pid = stack.processes["engine-1"].pid
            for rows, concurrency in ((1, 16), (1000, 4)):
                log(f"engine processes={processes} rows={rows} concurrency={concurrency} x2")
                before, began = _peers.cpu_seconds(pid), time.monotonic()
                got = _cells.cell(at, False, rows_table(rows), concurrency, seconds, 2, None, 4)
                busy = (_peers.cpu_seconds(pid) - before) / (time.monotonic() - began)
                results["processes"].append(
                    {"engine_processes": processes, "engine_cpu_pct": busy * 100, **got}
                )


def swap_phase(results: dict[str, Any], stack: Any, engine: str, swaps: int) -> None:
    log(f"swap under load: {swaps} swaps across {', '.join(TRIO)}")
    plan = SwapPlan("", "", "", models=["gbr", "xgb", "rf"], every=0.6, count=swaps)
    report = _cells.swap_run(engine, stack.control_address, rows_table(1), 400.0, plan)
    report.pop("timeline")
    report.pop("histogram_us")
    results["swap"] = report


def soak_phase(results: dict[str, Any], stack: Any, engine: str, swaps: int) -> None:
    log(f"soak: {swaps} back-to-back swaps, engine RSS sampled")
    pid = stack.processes["engine-1"].pid
    samples: list[tuple[int, float]] = [(-1, _cells.rss_mb(pid))]
    plan = SwapPlan(
        "",
        "",
        "",
        models=["gbr", "xgb", "rf"],
        every=0.0,
        count=swaps,
        on_swap=lambda i: samples.append((i, _cells.rss_mb(pid))),
    )
    report = _cells.swap_run(engine, stack.control_address, rows_table(1), 100.0, plan)
    tenth = next(mb for i, mb in samples if i >= swaps // 10 - 1)
    results["soak"] = {
        "swaps": len(report["swaps"]),
        "failed_swaps": sum(1 for s in report["swaps"] if s["error"]),
        "requests": report["requests"],
        "errors": report["errors"],
        "rss_start_mb": samples[0][1],
        "rss_after_10pct_mb": tenth,
        "rss_end_mb": samples[-1][1],
        "rss_ratio": samples[-1][1] / tenth,
        "deploy_ms_p50": statistics.median(s["deploy_ms"] for s in report["swaps"]),
        "rss_samples_mb": [mb for _, mb in samples[:: max(1, len(samples) // 50)]],
    }


# The two ways an engine can hold a big model, measured in one run (docs/adr/0010).
COST_MODES = {"in process": ("--isolate-above-mb", "off"), "own process": ()}


def cost_phase(
    results: dict[str, Any], models: dict[str, Path], sizes: list[int], tmp: Path
) -> None:
    """The serving pause while a model of each size is built and after it is retired.

    The engine keeps no retired version (`--retain-versions 0`), so every measured swap builds
    the new version from cached blobs and frees the one it replaces: the window (1 s either
    side of the deploy) covers the build, the switch and the free. Each size runs on an engine
    that loads every model in process and on one with the default (big models in a process of
    their own)."""
    out: list[dict[str, Any]] = []
    first = {name: path for name, path in models.items() if name == "rf"}
    for mode, flags in COST_MODES.items():
        engine_args = ("--retain-versions", "0", *flags)
        with _cells.service(tmp / f"cost-{len(out)}", 1, first, engine_args) as (stack, engine):
            stub = _cells.control(stack)
            for mb in sizes:
                log(f"cost growth: {mb} MB models, {mode}")
                names = []
                for variant in (0, 1):
                    name = f"trees{mb}mb{variant}"
                    _cells.upload(stub, name, _models.write_sized(tmp, mb, variant))
                    names.append(name)
                for name in (names[0], names[1], names[0]):  # both blobs fetched, unmeasured
                    _cells.deploy(stub, name)
                plan = SwapPlan("", "", "", models=[names[1], names[0]] * 2, every=3.0, count=4)
                report = _cells.swap_run(
                    engine, stack.control_address, rows_table(1), 200.0, plan, window_s=1.0
                )
                # The same load, as long as a median window, with no swap: the worst latency of
                # a window grows with its length alone, and big models' windows are longer.
                length = statistics.median(
                    s["window"]["to_s"] - s["window"]["from_s"] for s in report["swaps"]
                )
                quiet = _cells.quiet_worst_ms(engine, rows_table(1), 200.0, length, 3)
                size = _models.write_sized(tmp, mb, 0).stat().st_size
                swaps = [
                    {k: s[k] for k in ("deploy_ms", "prepare_ms", "load_ms", "commit_ms", "error")}
                    | {"pause_ms": s["window"]["max_ms"], "window_p99_ms": s["window"]["p99_ms"]}
                    for s in report["swaps"]
                ]
                out.append(
                    {
                        "mode": mode,
                        "megabytes": round(size / 1e6, 1),
                        "errors": report["errors"],
                        "steady_p99_ms": (report["steady_latency_ms"] or {}).get("p99"),
                        "swaps": swaps,
                        "deploy_ms_p50": statistics.median(s["deploy_ms"] for s in swaps),
                        "pause_ms": max(s["pause_ms"] for s in swaps),
                        "window_s": length,
                        "quiet_worst_ms": quiet,
                    }
                )
    results["cost"] = out


def pause_main(quick: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="hotswap-bench-pause-") as scratch:
        tmp = Path(scratch)
        result: dict[str, Any] = {"machine": _summary.machine()}
        cost_phase(result, tutorial_models(tmp), [1, 10] if quick else [1, 10, 100], tmp)
    lines = [*_summary.pause_table(result["cost"]), "", "| target | measured | goal | pass |"]
    lines += ["|---|---|---|---|"]
    lines += ["| {} | {} | {} | {} |".format(*t) for t in _summary.pause_targets(result["cost"])]
    write_phase("pause", "serving pause by model size", result, lines)
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shorter cells, 200-swap soak, ≤10 MB")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument(
        "--peers",
        action="store_true",
        help="also measure KServe's ModelServer (installed into bench/.peers on first use)",
    )
    p.add_argument(
        "--pause-only",
        action="store_true",
        help="only the serving pause by model size (make bench-pause): <date>-<host>-pause.md",
    )
    args = p.parse_args(argv)
    if args.pause_only:
        return pause_main(args.quick)
    seconds = 1.5 if args.quick else 4.0
    began = time.monotonic()
    results: dict[str, Any] = {"machine": _summary.machine(), "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="hotswap-bench-") as scratch:
        tmp = Path(scratch)
        models = tutorial_models(tmp)
        results["models"] = {m: str(p) for m, p in models.items()}
        serving_phases(results, models, tmp, seconds)
        tables = {n: rows_table(n) for n in (1, 1000)}
        results["protocols"] = _peers.phase(models, tmp, tables, seconds, args.peers, log)
        processes_phase(results, models, tmp, seconds)
        logging_phase(results, models, tmp, seconds)
        log("token check: open vs token file, 1 row")
        results["auth"] = _auth.phase(models, tmp, rows_table(1), seconds)
        results["shadow"] = _shadow.phase(models, tmp, tables, seconds, log)
        results["http"] = _http.phase(models, tmp, tables, seconds, args.peers, log)
        with _cells.service(tmp / "swaps", 1, models) as (stack, engine):
            swap_phase(results, stack, engine, 50)
            soak_phase(results, stack, engine, 200 if args.quick else 1000)
        cost_phase(results, models, [1, 10] if args.quick else [1, 10, 100], tmp)
        results["fleet"] = _fleet.phase(models, tmp, log, swaps=10 if args.quick else 20)
    results["elapsed_s"] = time.monotonic() - began
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y-%m-%d')}-{socket.gethostname()}"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    markdown = _summary.markdown(results)
    (args.out / f"{stem}.md").write_text(markdown)
    print(markdown)
    log(f"wrote {args.out / stem}.json/.md in {results['elapsed_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
