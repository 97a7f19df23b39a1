"""The readable summary: every figure, its ratio to the reference, the target, pass/miss."""

from __future__ import annotations

import os
import platform
import statistics
from typing import Any


def machine() -> dict[str, Any]:
    import grpc
    import onnxruntime

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "host": platform.node(),
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "grpcio": grpc.__version__,
        "platform": platform.platform(),
    }


def _pick(cells: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    return next(c for c in cells if all(c[k] == v for k, v in match.items()))


def _bare(cells: list[dict[str, Any]], key: str = "requests_s", **match: Any) -> dict[str, Any]:
    """The better bare variant (thread pool or inline) for one cell."""
    found = [c for c in cells if all(c[k] == v for k, v in match.items())]
    return min(found, key=lambda c: c[key]) if key == "p50_ms" else max(found, key=lambda c: c[key])


def _best(cells: list[dict[str, Any]], key: str, rows: int) -> dict[str, Any]:
    return max((c for c in cells if c["rows"] == rows), key=lambda c: c[key])


def _where(c: dict[str, Any]) -> str:
    inline = " inline" if c.get("inline") else ""
    return f"threads={c['threads']}{inline} c={c['concurrency']} P={c['processes']}"


def targets(r: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(what, measured, target, met) for each target of issue 4."""
    bare, svc = r["bare"], r["service"]
    out: list[tuple[str, str, str, bool]] = []
    b, s = _best(bare, "rows_s", 1000), _best(svc, "rows_s", 1000)
    ratio = s["rows_s"] / b["rows_s"]
    out.append(
        (
            "1,000-row rows/s vs bare (best cells)",
            f"{s['rows_s']:,.0f} vs {b['rows_s']:,.0f} = {ratio:.2f}x",
            ">= 0.95x",
            ratio >= 0.95,
        )
    )
    b1 = _bare(bare, "p50_ms", threads=1, rows=1, concurrency=1, processes=1)
    s1 = _pick(svc, threads=1, rows=1, concurrency=1, processes=1)
    delta = s1["p50_ms"] - b1["p50_ms"]
    out.append(
        (
            "1-row p50, one client (threads=1)",
            f"{s1['p50_ms']:.3f} vs {b1['p50_ms']:.3f} ms (+{delta:.3f})",
            "<= bare + 0.1 ms",
            delta <= 0.1,
        )
    )
    b, s = _best(bare, "requests_s", 1), _best(svc, "requests_s", 1)
    ratio = s["requests_s"] / b["requests_s"]
    out.append(
        (
            "best 1-row req/s vs bare",
            f"{s['requests_s']:,.0f} ({_where(s)}) vs {b['requests_s']:,.0f} ({_where(b)})"
            f" = {ratio:.2f}x",
            ">= 0.9x",
            ratio >= 0.9,
        )
    )
    sw = r["swap"]
    failed = sum(sw["errors"].values()) + sum(1 for x in sw["swaps"] if x["error"])
    out.append(
        (
            f"failed requests/swaps during {len(sw['swaps'])} swaps",
            f"{failed} of {sw['requests']} requests",
            "0",
            failed == 0,
        )
    )
    steady = (sw["steady_latency_ms"] or {}).get("p99") or float("nan")
    worst = max(x["window"]["p99_ms"] for x in sw["swaps"])
    over = sum(1 for x in sw["swaps"] if x["window"]["p99_ms"] > 1.5 * steady)
    out.append(
        (
            "swap-window p99 vs steady p99 (worst window)",
            f"{worst:.2f} vs {steady:.2f} ms = {worst / steady:.2f}x; {over} windows over",
            "<= 1.5x",
            worst <= 1.5 * steady,
        )
    )
    cached = [x for x in sw["swaps"] if x["index"] >= 3 and not x["error"]]
    deploy = statistics.median(x["deploy_ms"] for x in cached)
    out.append(("deploy() p50, blobs cached", f"{deploy:.1f} ms", "<= 20 ms", deploy <= 20))
    commit = statistics.median(x["commit_ms"] for x in cached)
    worst_commit = max(x["commit_ms"] for x in cached)
    out.append(
        (
            "commit (server, p50 / max)",
            f"{commit:.2f} / {worst_commit:.2f} ms",
            "<= 1 ms",
            commit <= 1,
        )
    )
    out += pause_targets(r["cost"])
    soak = r["soak"]
    out.append(
        (
            f"soak RSS end vs after 10% ({soak['swaps']} swaps)",
            f"{soak['rss_end_mb']:.0f} vs {soak['rss_after_10pct_mb']:.0f} MB"
            f" = {soak['rss_ratio']:.3f}x",
            "<= 1.05x",
            soak["rss_ratio"] <= 1.05,
        )
    )
    return out


def _serving_table(r: dict[str, Any]) -> list[str]:
    lines = [
        "| threads | rows | conc | procs | bare req/s (best of pool/inline) | hotswap req/s "
        "| ratio | bare rows/s "
        "| hotswap rows/s | bare p50 ms | hotswap p50 ms | hotswap p99 ms | errors "
        "| client CPU % |",
        "|" + "---|" * 14,
    ]
    for s in r["service"]:
        key = {k: s[k] for k in ("threads", "rows", "concurrency", "processes")}
        b = _bare(r["bare"], **key)
        lines.append(
            f"| {s['threads']} | {s['rows']} | {s['concurrency']} | {s['processes']} "
            f"| {b['requests_s']:,.0f}{' (inline)' if b['inline'] else ''} "
            f"| {s['requests_s']:,.0f} "
            f"| {s['requests_s'] / b['requests_s']:.2f} | {b['rows_s']:,.0f} | {s['rows_s']:,.0f} "
            f"| {b['p50_ms']:.3f} | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} | {s['errors']} "
            f"| {s['harness_cpu_pct']:.0f} |"
        )
    return lines


def _processes_table(cells: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "## One engine on 1 and 2 processes (2 client processes, 4 connections each)",
        "",
        "| engine processes | rows | conc per client | req/s | rows/s | p50 ms | p99 ms "
        "| engine CPU % (100 = a core) | client CPU % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        lines.append(
            f"| {c['engine_processes']} | {c['rows']} | {c['concurrency']} "
            f"| {c['requests_s']:,.0f} | {c['rows_s']:,.0f} | {c['p50_ms']:.3f} "
            f"| {c['p99_ms']:.3f} | {c['engine_cpu_pct']:.0f} | {c['harness_cpu_pct']:.0f} |"
        )
    return lines


def processes_target(cells: list[dict[str, Any]]) -> tuple[str, str, str, bool]:
    one = _pick(cells, engine_processes=1, rows=1)
    two = _pick(cells, engine_processes=2, rows=1)
    ratio = two["requests_s"] / one["requests_s"]
    return (
        "1-row req/s, engine on 2 processes vs 1 (2 cores, shared with the client)",
        f"{two['requests_s']:,.0f} vs {one['requests_s']:,.0f} = {ratio:.2f}x",
        "> 1x (scales with cores)",
        ratio > 1.0,
    )


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"# hotswap bench{' (--quick)' if r['quick'] else ''}",
        "",
        f"Machine: {m['cores']} cores, {m['cpu']}; Python {m['python']}, onnxruntime "
        f"{m['onnxruntime']}, grpcio {m['grpcio']}; {m['platform']}. "
        f"Client and servers share the cores. Run took {r.get('elapsed_s', 0):.0f} s.",
        "",
        "## Targets",
        "",
        "| target | measured | goal | |",
        "|---|---|---|---|",
    ]
    rows = targets(r)
    if r.get("protocols"):
        from bench import _peers

        floor = max(f["rows_s"] for f in r["floor"] if f["rows"] == 1000 and f["threads"] == 1)
        rows += _peers.targets(r["protocols"], floor)
    if r.get("processes"):
        rows.append(processes_target(r["processes"]))
    if r.get("fleet"):
        from bench import _fleet

        rows += _fleet.targets(r["fleet"])
    for what, got, goal, ok in rows:
        lines.append(f"| {what} | {got} | {goal} | {'pass' if ok else '**miss**'} |")
    if r.get("logging"):
        lines += [
            "",
            "## Inference log on vs off (1 engine, concurrency 4)",
            "",
            "| rows | log | req/s | p50 ms | p99 ms |",
            "|---|---|---|---|---|",
        ]
        for g in r["logging"]:
            lines.append(
                f"| {g['rows']} | {g['log']} | {g['requests_s']:,.0f} | {g['p50_ms']:.3f} "
                f"| {g['p99_ms']:.3f} |"
            )
    if r.get("protocols"):
        from bench import _peers

        lines += _peers.summary(r["protocols"])
    if r.get("processes"):
        lines += _processes_table(r["processes"])
    if r.get("auth"):
        from bench import _auth

        lines += _auth.summary(r["auth"])
    if r.get("http"):
        from bench import _http

        lines += _http.summary(r["http"])
    if r.get("shadow"):
        from bench import _shadow

        lines += _shadow.summary(r["shadow"])
    if r.get("fleet"):
        from bench import _fleet

        lines += _fleet.summary(r["fleet"])
    lines += [
        "",
        "## Floor: in-process ONNX Runtime (rf)",
        "",
        "| threads | rows | p50 ms | req/s | rows/s |",
        "|---|---|---|---|---|",
    ]
    for f in r["floor"]:
        lines.append(
            f"| {f['threads']} | {f['rows']} | {f['p50_ms']:.4f} | {f['requests_s']:,.0f} "
            f"| {f['rows_s']:,.0f} |"
        )
    best_floor = max(f["rows_s"] for f in r["floor"] if f["rows"] == 1000)
    best_svc = _best(r["service"], "rows_s", 1000)["rows_s"]
    floor_p50 = _pick(r["floor"], threads=1, rows=1)["p50_ms"]
    svc_p50 = _pick(r["service"], threads=1, rows=1, concurrency=1, processes=1)["p50_ms"]
    lines += [
        "",
        f"hotswap vs floor: 1,000-row rows/s {best_svc / best_floor:.2f}x of in-process; "
        f"1-row p50 {svc_p50:.3f} ms vs {floor_p50:.4f} ms in-process.",
        "",
        "## Bare reference vs hotswap (closed loop, same client, same batches)",
        "",
        *_serving_table(r),
    ]
    sw = r["swap"]
    good = [x for x in sw["swaps"] if not x["error"]]
    deploys = sorted(x["deploy_ms"] for x in good)
    steady = sw["steady_latency_ms"] or {}
    lines += [
        "",
        f"## Swap under load ({len(sw['swaps'])} swaps, open loop 400 req/s, 1 row)",
        "",
        f"requests {sw['requests']}, errors {sw['errors'] or 0}; steady p99 "
        f"{steady.get('p99', 0):.3f} ms, max {steady.get('max', 0):.3f} ms; deploy() ms p50 "
        f"{statistics.median(deploys):.1f} / p90 {deploys[int(0.9 * (len(deploys) - 1))]:.1f}"
        f" / max {deploys[-1]:.1f}; prepare p50 "
        f"{statistics.median(x['prepare_ms'] for x in good):.1f} ms; commit p50 "
        f"{statistics.median(x['commit_ms'] for x in good):.2f} ms; switch p50 "
        f"{statistics.median(x['switch_us'] for x in good):.1f} µs; window p99 ms p50 "
        f"{statistics.median(x['window']['p99_ms'] for x in good):.3f} / max "
        f"{max(x['window']['p99_ms'] for x in good):.3f}; window max ms p50 "
        f"{statistics.median(x['window']['max_ms'] for x in good):.3f} / max "
        f"{max(x['window']['max_ms'] for x in good):.3f}.",
    ]
    soak = r["soak"]
    lines += [
        "",
        f"## Soak ({soak['swaps']} swaps, {soak['failed_swaps']} failed; "
        f"{soak['requests']} requests, errors {soak['errors'] or 0})",
        "",
        f"engine RSS: start {soak['rss_start_mb']:.0f} MB, after 10% "
        f"{soak['rss_after_10pct_mb']:.0f} MB, end {soak['rss_end_mb']:.0f} MB "
        f"({soak['rss_ratio']:.3f}x); deploy() p50 {soak['deploy_ms_p50']:.1f} ms.",
    ]
    lines += pause_table(r["cost"])
    return "\n".join(lines) + "\n"


def pause_targets(cost: list[dict[str, Any]]) -> list[tuple[str, str, str, bool]]:
    """The worst window of the biggest model against the smallest's, as engines run by
    default (big models in a process of their own); then each over the median worst latency
    of its quiet runs, as long as its windows (older results have no quiet runs)."""
    mine = [c for c in cost if c["mode"] == "own process"]
    small, big = mine[0], mine[-1]
    ratio = big["pause_ms"] / small["pause_ms"]
    out = [
        (
            f"serving pause {big['megabytes']} MB vs {small['megabytes']} MB (built, then freed)",
            f"{big['pause_ms']:.2f} vs {small['pause_ms']:.2f} ms = {ratio:.2f}x",
            "not growing (<= 1.5x)",
            ratio <= 1.5,
        )
    ]
    if "quiet_worst_ms" in big:
        excess = [c["pause_ms"] / statistics.median(c["quiet_worst_ms"]) for c in (small, big)]
        out.append(
            (
                f"the same, each over its quiet control (no swap, {small['window_s']:.1f} and "
                f"{big['window_s']:.1f} s runs)",
                f"{excess[1]:.2f}x vs {excess[0]:.2f}x = {excess[1] / excess[0]:.2f}x",
                "not growing (<= 1.5x)",
                excess[1] / excess[0] <= 1.5,
            )
        )
    return out


def pause_table(cost: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "## Serving pause by model size (random tree ensembles; open loop 200 req/s, 1 row)",
        "",
        "Each swap builds the new version from cached blobs and frees the old one "
        "(`--retain-versions 0`); a window is the deploy and 1 s either side. In process: "
        "`--isolate-above-mb off`; own process: the default (models of 8 MiB or more).",
        "",
        "Quiet control: the same load on the same engine for as long as a median window, with "
        "no swap, run three times after the swaps; the median of their worst latencies (the "
        "worst of a run grows with its length alone, and the first run may still see the last "
        "swap's old version freed).",
        "",
        "| model MB | engine holds it | deploy ms p50 | prepare ms p50 | pause ms (worst window) "
        "| window p99 ms (worst) | steady p99 ms | quiet control: worst ms (run s) | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cost:
        s = c["swaps"]
        quiet = (
            f"{statistics.median(c['quiet_worst_ms']):.2f} ({c['window_s']:.1f} s)"
            if "quiet_worst_ms" in c
            else "-"
        )
        lines.append(
            f"| {c['megabytes']} | {c['mode']} | {c['deploy_ms_p50']:.1f} "
            f"| {statistics.median(x['prepare_ms'] for x in s):.1f} | {c['pause_ms']:.2f} "
            f"| {max(x['window_p99_ms'] for x in s):.2f} | {c['steady_p99_ms'] or 0:.2f} "
            f"| {quiet} | {sum((c['errors'] or {}).values())} |"
        )
    return lines
