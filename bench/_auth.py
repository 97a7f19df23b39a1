"""The cost of the engine's token check, measured two ways in one run:

- in-process: the interceptor's admission of one call (hash the token, look it up, check the
  request's workspace), the work the check adds to every RPC;
- end to end: the same 1-row cells on an open stack and on one with a token file, measured
  back to back and alternated, so machine noise hits both alike.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bench import _cells
from hotswap.engine import access
from hotswap.engine._auth_interceptor import EngineAuthInterceptor
from hotswap.v1 import engine_pb2

TOKEN = "bench-token-0123456789abcdef"


def admission_us(calls: int = 200_000) -> float:
    rules = access.Rules(fail_closed=True)
    import hashlib

    digest = hashlib.sha256(TOKEN.encode()).digest()
    rules.update(True, [access.Grant("bench", digest, frozenset({_cells.WS}))])
    guard = EngineAuthInterceptor(rules)
    metadata = {"authorization": f"Bearer {TOKEN}"}
    request = engine_pb2.InferRequest(workspace=_cells.WS, pipeline=_cells.PIPELINE)
    start = time.perf_counter()
    for _ in range(calls):
        guard._admit("/hotswap.v1.Engine/Infer", metadata)(request)
    return (time.perf_counter() - start) / calls * 1e6


def intercept_us(calls: int = 50_000) -> float:
    """The whole interceptor on one call: build the checked handler, run it around a handler
    that does nothing (what the engine adds to every RPC besides the admission above)."""
    import asyncio
    import hashlib

    import grpc

    rules = access.Rules(fail_closed=True)
    digest = hashlib.sha256(TOKEN.encode()).digest()
    rules.update(True, [access.Grant("bench", digest, frozenset({_cells.WS}))])
    guard = EngineAuthInterceptor(rules)

    async def nothing(request: Any, context: Any) -> None:
        return None

    handler: Any = grpc.unary_unary_rpc_method_handler(nothing)

    async def continuation(details: Any) -> Any:
        return handler

    class Details:
        method = "/hotswap.v1.Engine/Infer"
        invocation_metadata = (("authorization", f"Bearer {TOKEN}"),)

    request = engine_pb2.InferRequest(workspace=_cells.WS, pipeline=_cells.PIPELINE)

    async def measure() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            checked: Any = await guard.intercept_service(continuation, Details())  # type: ignore[arg-type]
            await checked.unary_unary(request, None)
        return (time.perf_counter() - start) / calls * 1e6

    async def baseline() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            found = await continuation(Details())
            await found.unary_unary(request, None)
        return (time.perf_counter() - start) / calls * 1e6

    return asyncio.run(measure()) - asyncio.run(baseline())


def phase(models: dict[str, Path], tmp: Path, table: Any, seconds: float) -> dict[str, Any]:
    tokens = tmp / "tokens.json"
    tokens.write_text(
        json.dumps(
            {
                "users": [{"name": "bench", "token": TOKEN, "workspaces": ["*"]}],
                "engines": [{"name": "fleet", "token": "bench-engine-0123456789abcdef"}],
            }
        )
    )
    engine_token = tmp / "engine.token"
    engine_token.write_text("bench-engine-0123456789abcdef")
    rf = {"rf": models["rf"]}
    cells: list[dict[str, Any]] = []
    with (
        _cells.service_address(tmp / "auth-open", 1, rf) as open_engine,
        _cells.service(
            tmp / "auth-secured",
            1,
            rf,
            engine_args=("--control-token-file", str(engine_token)),
            control_args=("--tokens-file", str(tokens)),
            token=TOKEN,
        ) as (_, secured_engine),
    ):
        for _ in range(2):
            for concurrency in (1, 4):
                for mode, address, token in (
                    ("open", open_engine, None),
                    ("tokens", secured_engine, TOKEN),
                ):
                    got = _cells.cell(address, False, table, concurrency, seconds, token=token)
                    cells.append({"mode": mode, **got})
    return {"admission_us": admission_us(), "intercept_us": intercept_us(), "cells": cells}


def summary(auth: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Token check on the engine (1 row; open vs token file, alternated)",
        "",
        f"In-process admission of one call (hash, look-up, workspace check): "
        f"{auth['admission_us']:.2f} µs; the whole interceptor around a call (admission, "
        f"the checked handler built and run): {auth.get('intercept_us', 0):.2f} µs.",
        "",
        "| concurrency | mode | req/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for c in auth["cells"]:
        lines.append(
            f"| {c['concurrency']} | {c['mode']} | {c['requests_s']:,.0f} | {c['p50_ms']:.3f} "
            f"| {c['p99_ms']:.3f} |"
        )
    return lines


def main() -> int:
    """`make bench-auth`: this phase alone, written to bench/results/<date>-<host>-auth."""
    import tempfile

    from bench import run

    with tempfile.TemporaryDirectory(prefix="hotswap-bench-auth-") as scratch:
        tmp = Path(scratch)
        result = phase(run.tutorial_models(tmp), tmp, run.rows_table(1), 4.0)
    run.write_phase("auth", "the engine's token check", result, summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
