"""Command line of ``hotswap loadtest`` (also ``python -m hotswap.clients.loadtest``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import grpc

from hotswap.clients._errors import HotswapError, from_rpc_error
from hotswap.clients._rpc import Security
from hotswap.clients.loadtest import _input
from hotswap.clients.loadtest._report import plot, text
from hotswap.clients.loadtest._run import run_load
from hotswap.clients.loadtest._runner import LoadSpec, Target
from hotswap.clients.loadtest._swap import SwapPlan, endpoints, restore

DEFAULT_ADDRESS = "localhost:50051"
DEFAULT_WORKSPACE = "default"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hotswap loadtest",
        description="Load a deployed pipeline (optionally swapping its model) and report "
        "throughput, latency percentiles, errors and per-swap figures. Its requests are "
        "logged by the engines as metadata.source = 'loadtest'.",
    )
    p.add_argument("pipeline", help="the deployed pipeline to load")
    p.add_argument(
        "--address",
        default=argparse.SUPPRESS,
        help="control plane host:port (default $HOTSWAP_ADDRESS, else localhost:50051)",
    )
    p.add_argument(
        "--workspace",
        default=argparse.SUPPRESS,
        help="workspace of the pipeline (default $HOTSWAP_WORKSPACE, else 'default')",
    )
    p.add_argument("--engine", action="append", help="engine host:port (default: ask control)")
    p.add_argument("--token", help="bearer token (default $HOTSWAP_TOKEN)")
    p.add_argument("--tls-ca", help="CA PEM to verify the servers (default $HOTSWAP_TLS_CA)")
    p.add_argument("--tls-cert", help="client certificate PEM, for mutual TLS")
    p.add_argument("--tls-key", help="private key PEM of --tls-cert")
    load = p.add_argument_group("load")
    load.add_argument("--concurrency", type=int, default=1, help="closed loop: calls in flight")
    load.add_argument("--rate", type=float, default=0.0, help="open loop: requests/s in total")
    load.add_argument("--duration", type=float, help="seconds")
    load.add_argument("--requests", type=int, help="total requests")
    load.add_argument("--processes", type=int, default=1, help="client processes")
    load.add_argument(
        "--connections",
        type=int,
        default=1,
        help="connections per engine in each client process (at least the engine's "
        "--processes, to load all of them)",
    )
    load.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    data = p.add_argument_group("input")
    data.add_argument("--input", type=Path, help=".arrow (IPC file/stream) or .df.json")
    data.add_argument("--width", type=int, default=18, help="generated row width")
    data.add_argument("--batch-rows", type=int, help="rows per request (default: 1 / the file)")
    swap = p.add_argument_group(
        "swaps",
        "Each swap makes a new pipeline version with one of --models and deploys it; at the "
        "end the pipeline is put back on the version it was on.",
    )
    swap.add_argument("--swap-every", type=float, help="seconds between swaps (needs --models)")
    swap.add_argument("--models", help="comma-separated uploaded models to cycle through")
    swap.add_argument("--swaps", type=int, help="stop after this many swaps")
    out = p.add_argument_group("output")
    out.add_argument("--window-ms", type=float, default=250.0, help="± around each swap")
    out.add_argument("--slice-ms", type=float, default=50.0, help="timeline resolution")
    out.add_argument(
        "--json", action="store_true", help="print the whole report as JSON instead of text"
    )
    out.add_argument("--report", type=Path, help="also write the whole report (JSON) here")
    out.add_argument("--plot", type=Path, help="PNG of latency over time (needs matplotlib)")
    out.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.address = getattr(args, "address", None) or os.environ.get(
        "HOTSWAP_ADDRESS", DEFAULT_ADDRESS
    )
    args.workspace = getattr(args, "workspace", None) or os.environ.get(
        "HOTSWAP_WORKSPACE", DEFAULT_WORKSPACE
    )
    swapping = args.swap_every is not None
    if swapping and not args.models:
        parser.error("--swap-every needs --models a,b,c")
    if args.duration is None and args.requests is None and not (swapping and args.swaps):
        parser.error("bound the run with --duration and/or --requests (or --swaps)")
    if args.concurrency < 1 or args.processes < 1 or args.connections < 1:
        parser.error("--concurrency, --processes and --connections must be ≥ 1")
    try:
        if args.input:
            table = _input.batch(_input.read_table(args.input), args.batch_rows)
        else:
            table = _input.generated(args.width, args.batch_rows or 1)
        security = Security.resolve(
            os.environ, args.token, args.tls_ca, args.tls_cert, args.tls_key
        )
        served, started_on = endpoints(args.address, args.workspace, args.pipeline, security)
        addresses = args.engine or served
    except grpc.RpcError as err:
        target = f"the control plane at {args.address}"
        print(f"hotswap loadtest: error: {from_rpc_error(err, target=target)}", file=sys.stderr)
        return 1
    except (HotswapError, OSError, ValueError) as exc:
        print(f"hotswap loadtest: error: {exc}", file=sys.stderr)
        return 2
    if not addresses:
        print(
            f"hotswap loadtest: error: pipeline {args.pipeline!r} is deployed but no engine "
            "serves it right now (see `hotswap pipeline status`)",
            file=sys.stderr,
        )
        return 1
    spec = LoadSpec(
        target=Target(tuple(addresses), args.workspace, args.pipeline, security=security),
        body=_input.ipc_stream(table),
        rows=table.num_rows,
        concurrency=args.concurrency,
        rate=args.rate,
        duration=args.duration,
        requests=args.requests,
        processes=args.processes,
        slice_s=args.slice_ms / 1e3,
        timeout=args.timeout,
        connections=args.connections,
    )
    plan = None
    if swapping:
        plan = SwapPlan(
            control=args.address,
            workspace=args.workspace,
            pipeline=args.pipeline,
            models=[m.strip() for m in args.models.split(",") if m.strip()],
            every=args.swap_every,
            count=args.swaps,
            stop_load_after=args.duration is None and args.requests is None,
            security=security,
        )
    try:
        report = run_load(
            spec, plan, window_s=args.window_ms / 1e3, progress=None if not args.quiet else False
        )
    finally:
        if plan is not None:
            restored = restore(plan, started_on)
            print(f"hotswap loadtest: {restored}", file=sys.stderr)
    print(json.dumps(report, indent=1) if args.json else text(report))
    if args.report:
        args.report.write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(report, args.plot)
    failed_swaps = any(s["error"] for s in report["swaps"])
    return 1 if report["errors"] or failed_swaps else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
