"""Turning merged samples and swap records into the report: dict (JSON), text, plot."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hotswap.clients.loadtest._histogram import Histogram
from hotswap.clients.loadtest._runner import LoadSpec, WorkerResult
from hotswap.clients.loadtest._swap import SwapRecord

PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.9": 99.9}


def latency_ms(hist: Histogram) -> dict[str, float]:
    out = {name: hist.percentile(q) / 1e3 for name, q in PERCENTILES.items()}
    out["max"] = hist.max / 1e3
    out["mean"] = hist.mean() / 1e3
    out["count"] = float(hist.total)
    return out


def _in_windows(index: int, slice_s: float, windows: list[tuple[float, float]]) -> bool:
    low, high = index * slice_s, (index + 1) * slice_s
    return any(low < b and high > a for a, b in windows)


def summarise(
    spec: LoadSpec, result: WorkerResult, swaps: list[SwapRecord], window_s: float
) -> dict[str, Any]:
    wall = result.wall_s or 1e-9
    windows: list[tuple[float, float]] = []
    for swap in swaps:
        window = (swap.start_s - window_s, swap.end_s + window_s)
        windows.append(window)
        parts = [h for i, h in result.slices.items() if _in_windows(i, spec.slice_s, [window])]
        merged = Histogram.merged(parts)
        swap.window = {
            "from_s": window[0],
            "to_s": window[1],
            "p99_ms": merged.percentile(99) / 1e3,
            "max_ms": merged.max / 1e3,
            "count": merged.total,
        }
        swap.served = result.versions.get(swap.version, 0)
    steady = Histogram.merged(
        h for i, h in result.slices.items() if not _in_windows(i, spec.slice_s, windows)
    )
    errors = sum(result.errors.values())
    return {
        "target": {
            "addresses": list(spec.target.addresses),
            "workspace": spec.target.workspace,
            "pipeline": spec.target.pipeline,
            "bare": spec.target.bare,
        },
        "config": {
            "concurrency": spec.concurrency,
            "rate": spec.rate,
            "duration": spec.duration,
            "requests": spec.requests,
            "processes": spec.processes,
            "batch_rows": spec.rows,
            "body_bytes": len(spec.body),
            "slice_s": spec.slice_s,
            "window_s": window_s,
        },
        "wall_s": result.wall_s,
        "requests": result.ok + errors,
        "ok": result.ok,
        "errors": dict(sorted(result.errors.items())),
        "throughput": {"requests_s": result.ok / wall, "rows_s": result.ok * spec.rows / wall},
        "latency_ms": latency_ms(result.histogram),
        "steady_latency_ms": latency_ms(steady) if steady.total else None,
        "versions": {str(v): n for v, n in sorted(result.versions.items())},
        "swaps": [s.to_dict() for s in swaps],
        "harness": {
            "processes": spec.processes,
            "cpu_s": result.cpu_s,
            # Busy share of one core; near 100% per process means the client is the bottleneck.
            "cpu_pct_of_one_core": 100 * result.cpu_s / wall,
            "max_rss_mb": result.max_rss_kb / 1024,
        },
        "timeline": [
            {"t_s": i * spec.slice_s, **latency_ms(result.slices[i])} for i in sorted(result.slices)
        ],
        "histogram_us": result.histogram.to_dict(),
    }


def text(report: dict[str, Any]) -> str:
    lat = report["latency_ms"]
    thr = report["throughput"]
    lines = [
        f"requests {report['requests']}  ok {report['ok']}  errors {report['errors'] or 0}"
        f"  in {report['wall_s']:.2f}s",
        f"throughput {thr['requests_s']:.0f} req/s  {thr['rows_s']:.0f} rows/s",
        "latency ms  " + "  ".join(f"{k} {lat[k]:.3f}" for k in [*PERCENTILES, "max"]),
    ]
    steady = report["steady_latency_ms"]
    if report["swaps"] and steady:
        lines.append(
            f"steady (outside swap windows) p99 {steady['p99']:.3f}  max {steady['max']:.3f}"
        )
    for s in report["swaps"]:
        if s["error"]:
            lines.append(f"swap {s['index']} -> {s['model']}: FAILED {s['error']}")
            continue
        w = s["window"]
        lines.append(
            f"swap {s['index']} -> {s['model']} v{s['version']}: deploy {s['deploy_ms']:.1f} ms"
            f" (prepare {s['prepare_ms']:.1f}, commit {s['commit_ms']:.2f})"
            f"  window p99 {w['p99_ms']:.3f} max {w['max_ms']:.3f} ms  served {s['served']}"
        )
    h = report["harness"]
    lines.append(
        f"harness: {h['processes']} process(es), {h['cpu_s']:.2f} CPU s"
        f" ({h['cpu_pct_of_one_core']:.0f}% of one core)"
    )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> bool:
    """Latency over time with each swap marked; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); skipped", file=sys.stderr)
        return False
    points = report["timeline"]
    t = [p["t_s"] for p in points]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for key, width in (("p99", 1.6), ("p50", 1.2)):
        ax.plot(t, [p[key] for p in points], "-", label=key, linewidth=width)
    # max as dots drawn over the lines: where it equals p99 (few requests in a slice) both
    # stay visible.
    ax.plot(t, [p["max"] for p in points], "o", label="max", markersize=3, color="black",
            alpha=0.6, zorder=3)  # fmt: skip
    ax.set_yscale("log")
    # Ticks at 1, 2 and 5 of every decade, written as plain numbers ("20", not "2 x 10^1").
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    top = ax.get_ylim()[1]
    for s in report["swaps"]:
        ax.axvspan(s["start_s"], max(s["end_s"], s["start_s"] + 0.002), color="red", alpha=0.3)
        label = f"{s['model']} v{s['version']}" if not s["error"] else f"{s['model']} failed"
        ax.annotate(
            label,
            (s["start_s"], top),
            xytext=(2, -2),
            textcoords="offset points",
            rotation=90,
            va="top",
            fontsize=7,
            color="darkred",
        )
    ax.set_xlabel("seconds (red: deploy in progress, labelled with the model swapped to)")
    ax.set_ylabel("latency ms")
    ax.set_title(f"{report['ok']} requests, {len(report['swaps'])} swaps")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
