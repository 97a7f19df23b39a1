"""The 16-engine fleet: deploy time and the cutover spread, light and under a saturating load.

One control plane and FLEET engines as processes on this machine, the tutorial's models
swapped round robin on every engine (replicas = FLEET). A prober process asks each engine for
a 1-row inference every 10 ms and notes when each engine first answers with each new version:
the spread of those instants over the engines is the cutover window clients see. The engines'
own switch instants (`switched_at_us`, kept in the swap timeline) give the same window without
the probe's 10 ms grain. Then the same swaps under `hotswap loadtest` saturating every engine.

    python -m bench._fleet [--engines 16] [--swaps 20]       (make bench runs it as a phase)
    python -m bench._fleet probe OUT STOP ADDRESS...         (the prober, started by the phase)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from bench import _cells, _peers
from hotswap.clients._stack import LocalStack
from hotswap.clients.loadtest import _input
from hotswap.v1 import control_pb2 as c
from hotswap.v1 import engine_pb2

FLEET = 16
PROBE_INTERVAL = 0.010
ROOT = Path(__file__).resolve().parent.parent


# -- the prober (its own process: the deploying process's GIL must not delay its probes) ----


async def _probe_engine(
    address: str, request: bytes, stop: Path, seen: list[tuple[str, int, float]]
) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        infer: Any = channel.unary_unary(
            "/hotswap.v1.Engine/Infer", response_deserializer=engine_pb2.InferResponse.FromString
        )
        last = -1
        next_at = time.monotonic()
        while not stop.exists():
            sent = time.monotonic()
            try:
                version = (await infer(request, timeout=5)).pipeline_version
            except grpc.aio.AioRpcError:
                version = -1
            if version != last:
                seen.append((address, version, sent))
                last = version
            next_at += PROBE_INTERVAL
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def _probe(out: Path, stop: Path, addresses: list[str]) -> None:
    body = _input.ipc_stream(_input.generated(18, 1))
    request = engine_pb2.InferRequest(
        workspace=_cells.WS, pipeline=_cells.PIPELINE, arrow=body
    ).SerializeToString()
    seen: list[tuple[str, int, float]] = []
    await asyncio.gather(*(_probe_engine(a, request, stop, seen) for a in addresses))
    out.write_text(json.dumps(seen))


# -- the phase ------------------------------------------------------------------------------


def _spread_ms(instants: list[float]) -> float:
    return (max(instants) - min(instants)) * 1000


def _deploys(stub: Any, models: list[str], swaps: int, pace: float) -> list[dict[str, Any]]:
    """`swaps` deploys round robin over `models`; each one's wall time and switch instants."""
    done = []
    for index in range(swaps):
        model = models[(index + 1) % len(models)]
        version = stub.CreatePipelineVersion(
            c.CreatePipelineVersionRequest(
                workspace=_cells.WS, pipeline=_cells.PIPELINE, steps=[c.StepRef(model=model)]
            )
        ).number
        started = time.perf_counter()
        answer = stub.Deploy(
            c.DeployRequest(workspace=_cells.WS, pipeline=_cells.PIPELINE, version=version),
            timeout=120,
        )
        wall_ms = (time.perf_counter() - started) * 1000
        switched = [e.switched_at_us / 1e6 for e in answer.engines if e.switched_at_us]
        done.append(
            {
                "version": version,
                "deploy_ms": wall_ms,
                "prepare_ms": answer.prepare_ms,
                "commit_ms": answer.commit_ms,
                "engines": len(answer.engines),
                "engine_spread_ms": _spread_ms(switched) if switched else None,
            }
        )
        time.sleep(pace)  # let every prober see this version before the next deploy
    return done


def _probe_spreads(seen: list[list[Any]], versions: list[int], engines: int) -> list[float]:
    """Per deployed version: the spread of the engines' first answers with it, when every
    engine was seen answering it."""
    first: dict[int, dict[str, float]] = {}
    for address, version, sent in seen:
        first.setdefault(version, {}).setdefault(address, sent)
    return [
        _spread_ms(list(first[v].values()))
        for v in versions
        if v in first and len(first[v]) == engines
    ]


def _summary(deploys: list[dict[str, Any]], probe: list[float]) -> dict[str, Any]:
    def p50(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    engine_spreads = [d["engine_spread_ms"] for d in deploys if d["engine_spread_ms"] is not None]
    return {
        "swaps": len(deploys),
        "deploy_p50_ms": p50([d["deploy_ms"] for d in deploys]),
        "deploy_max_ms": max(d["deploy_ms"] for d in deploys),
        "prepare_p50_ms": p50([d["prepare_ms"] for d in deploys]),
        "commit_p50_ms": p50([d["commit_ms"] for d in deploys]),
        "engine_spread_p50_ms": p50(engine_spreads),
        "engine_spread_max_ms": max(engine_spreads, default=None),
        "probe_spread_p50_ms": p50(probe),
        "probe_spread_max_ms": max(probe, default=None),
        "probed_swaps": len(probe),
        "deploys": deploys,
    }


def _cpu_seconds(stack: LocalStack) -> dict[str, float]:
    """CPU seconds so far of the control plane and of all engines together."""
    used = {"control": 0.0, "engines": 0.0}
    for name, process in stack.processes.items():
        used["control" if name == "control" else "engines"] += _peers.cpu_seconds(process.pid)
    return used


def _cores(stack: LocalStack, seconds: float) -> dict[str, float]:
    """Cores the control plane and the engines use over `seconds` of doing nothing."""
    before, started = _cpu_seconds(stack), time.perf_counter()
    time.sleep(seconds)
    after, wall = _cpu_seconds(stack), time.perf_counter() - started
    return {k: (after[k] - before[k]) / wall for k in after}


def _series(
    stack: LocalStack, stub: Any, tmp: Path, name: str, swaps: int, engines: int
) -> tuple[list[dict[str, Any]], list[float]]:
    out, stop = tmp / f"probe-{name}.json", tmp / f"probe-{name}.stop"
    prober = subprocess.Popen(
        [sys.executable, "-m", "bench._fleet", "probe", str(out), str(stop),
         *stack.engine_addresses],
        cwd=ROOT,
    )  # fmt: skip
    try:
        time.sleep(1.0)  # the prober's channels connect
        deploys = _deploys(stub, ["rf", "gbr", "xgb"], swaps, pace=0.3)
    finally:
        stop.touch()
        prober.wait(timeout=60)
    seen = json.loads(out.read_text())
    return deploys, _probe_spreads(seen, [d["version"] for d in deploys], engines)


def phase(
    models: dict[str, Path],
    tmp: Path,
    log: Callable[[str], None],
    engines: int = FLEET,
    swaps: int = 20,
) -> dict[str, Any]:
    log(f"fleet: {engines} engines, {swaps} swaps light, {swaps} under a saturating load")
    with LocalStack(tmp / "fleet", engines=engines, engine_args=("--workers", "2")) as stack:
        stub = _cells.control(stack)
        stub.CreateWorkspace(c.CreateWorkspaceRequest(name=_cells.WS))
        for model, path in models.items():
            _cells.upload(stub, model, path)
        stub.CreatePipeline(c.CreatePipelineRequest(workspace=_cells.WS, name=_cells.PIPELINE))
        first = stub.CreatePipelineVersion(
            c.CreatePipelineVersionRequest(
                workspace=_cells.WS, pipeline=_cells.PIPELINE, steps=[c.StepRef(model="rf")]
            )
        ).number
        stub.Deploy(
            c.DeployRequest(
                workspace=_cells.WS, pipeline=_cells.PIPELINE, version=first, replicas=engines
            ),
            timeout=300,
        )
        # Every model once on every engine first: the series measure swaps, not first loads.
        _deploys(stub, ["rf", "gbr", "xgb"], 3, pace=0.1)
        # What the fleet costs doing nothing: heartbeats and the services' own timers.
        idle = _cores(stack, 5.0)
        # No probe: on 2 cores, 16 engines each probed every 10 ms are busy already.
        quiet = _deploys(stub, ["rf", "gbr", "xgb"], swaps, pace=0.1)
        light = _series(stack, stub, tmp, "light", swaps, engines)
        load = subprocess.Popen(
            [str(Path(sys.executable).parent / "hotswap"), "loadtest", _cells.PIPELINE,
             "--address", stack.control_address, "--workspace", _cells.WS,
             "--concurrency", "64", "--processes", "2", "--duration", str(swaps * 1.5 + 10),
             "--quiet"],
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # its client processes go with it (killpg below)
        )  # fmt: skip
        try:
            time.sleep(2.0)  # the load reaches its plateau
            loaded = _series(stack, stub, tmp, "loaded", swaps, engines)
        finally:
            os.killpg(load.pid, signal.SIGTERM)
            load.wait(timeout=30)
    calm, busy = _summary(*light), _summary(*loaded)
    result: dict[str, Any] = {
        "engines": engines,
        "idle_engine_cores": idle["engines"],
        "idle_control_cores": idle["control"],
        "quiet": _summary(quiet, []),
        "light": calm,
        "loaded": busy,
    }
    for key in ("deploy_p50_ms", "engine_spread_p50_ms", "probe_spread_p50_ms"):
        base, under = calm[key], busy[key]
        result[f"{key}_loaded_ratio"] = under / base if base and under is not None else None
    return result


def targets(fleet: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(what, measured, goal, met) for the fleet's goals (issue 13)."""
    quiet, light, loaded, n = fleet["quiet"], fleet["light"], fleet["loaded"], fleet["engines"]

    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f} ms"

    def within(value: float | None, goal: float) -> bool:
        return value is not None and value <= goal

    def ratio(key: str) -> float:
        value = fleet[f"{key}_loaded_ratio"]
        return float("inf") if value is None else float(value)

    rows = [
        (f"{n}-engine deploy p50, no probe", ms(quiet["deploy_p50_ms"]), "<= 50 ms",
         within(quiet["deploy_p50_ms"], 50)),
        (f"{n}-engine cutover spread p50, no probe, engines' switch instants",
         ms(quiet["engine_spread_p50_ms"]), "<= 5 ms", within(quiet["engine_spread_p50_ms"], 5)),
        (f"{n}-engine deploy p50 (probed)", ms(light["deploy_p50_ms"]), "<= 50 ms",
         within(light["deploy_p50_ms"], 50)),
        (f"{n}-engine cutover spread p50, as probed every 10 ms",
         ms(light["probe_spread_p50_ms"]), "<= 15 ms", within(light["probe_spread_p50_ms"], 15)),
        (f"{n}-engine cutover spread p50, engines' switch instants",
         ms(light["engine_spread_p50_ms"]), "<= 5 ms", within(light["engine_spread_p50_ms"], 5)),
    ]  # fmt: skip
    for key, what in (("deploy_p50_ms", "deploy p50"), ("probe_spread_p50_ms", "probed spread")):
        rows.append(
            (f"{n}-engine {what} under a saturating load vs light",
             f"{ms(loaded[key])} = {ratio(key):.1f}x", "<= 2x", ratio(key) <= 2)
        )  # fmt: skip
    return rows


def summary(fleet: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"## Fleet: {fleet['engines']} engines on this machine, every one swapped together",
        "",
        "quiet: no other load. light: a prober asks each engine for 1 row every 10 ms "
        "(1,600 requests/s, which on 2 cores already keeps the engines ~75 % busy and the "
        "prober's own clock late); spread = first to last engine answering with the new "
        "version. The engines' own switch instants (`switched_at_us`) give it without the "
        "10 ms grain. loaded: the prober plus `hotswap loadtest` at concurrency 64 from 2 "
        "processes over every engine.",
        "",
        "| load | swaps | deploy p50 / max ms | prepare p50 | commit p50 | spread (engines) "
        "p50 / max ms | spread (probed) p50 / max ms |",
        "|---|---|---|---|---|---|---|",
    ]
    idle = (
        f"Idle, before the swaps: the {fleet['engines']} engines used "
        f"{fleet['idle_engine_cores']:.3f} cores together, the control plane "
        f"{fleet['idle_control_cores']:.3f}."
    )
    for name in ("quiet", "light", "loaded"):
        s = fleet[name]

        def f(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.1f}"

        lines.append(
            f"| {name} | {s['swaps']} | {f(s['deploy_p50_ms'])} / {f(s['deploy_max_ms'])} "
            f"| {f(s['prepare_p50_ms'])} | {f(s['commit_p50_ms'])} "
            f"| {f(s['engine_spread_p50_ms'])} / {f(s['engine_spread_max_ms'])} "
            + (
                f"| {f(s['probe_spread_p50_ms'])} / {f(s['probe_spread_max_ms'])} "
                f"({s['probed_swaps']} swaps seen by every probe) |"
                if name != "quiet"
                else "| not probed |"
            )
        )
    return [*lines, "", idle]


def main(argv: list[str]) -> int:
    if argv[:1] == ["probe"]:
        asyncio.run(_probe(Path(argv[1]), Path(argv[2]), argv[3:]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engines", type=int, default=FLEET)
    parser.add_argument("--swaps", type=int, default=20)
    args = parser.parse_args(argv)
    from bench.run import log, tutorial_models

    with tempfile.TemporaryDirectory(prefix="hotswap-fleet-") as scratch:
        result = phase(tutorial_models(Path(scratch)), Path(scratch), log, args.engines, args.swaps)
    for name in ("quiet", "light", "loaded"):
        result[name].pop("deploys")  # the summary, not each deploy
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
