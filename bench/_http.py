"""HTTP's cost next to gRPC's, on one engine in one run.

The same engine serves rf over gRPC (the native Arrow Infer, OIP ModelInfer) and HTTP (OIP
REST in JSON and with the binary data extension, Wallaroo's pandas-records and Arrow file).
Neutral clients send prebuilt request bytes on kept-alive connections, one asyncio task per
concurrent caller, and read answers whole without parsing them, so what differs between rows
is the server's work per protocol, which the engine's CPU per request (from the OS) shows
directly. With `--peers`, KServe's REST port is measured the same way (OIP JSON).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pyarrow as pa

from bench import _cells, _peers
from bench._cells import PIPELINE, WS
from hotswap.clients.loadtest import _input
from hotswap.v1 import engine_pb2

CELLS = ((1, 1), (1, 4), (1000, 4))
INFER = "/hotswap.v1.Engine/Infer"
WARM_UP = 20


def _post(address: str, path: str, content_type: str, body: bytes, extra: str = "") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


def _arrow_file(x: np.ndarray) -> bytes:
    table = pa.table({"tensor": pa.FixedSizeListArray.from_arrays(x.ravel(), x.shape[1])})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def http_requests(x: np.ndarray, address: str, input_name: str) -> dict[str, bytes]:
    """Every HTTP kind for rows `x`, as the bytes a client sends."""
    oip = f"/v2/models/{PIPELINE}/infer"
    tensor = {"name": input_name, "shape": list(x.shape), "datatype": "FP32"}
    # An id: KServe's REST answer fails its own validation without one.
    as_json = json.dumps({"id": "b", "inputs": [{**tensor, "data": x.ravel().tolist()}]}).encode()
    header = json.dumps(
        {
            "id": "b",
            "inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
            "outputs": [{"name": "variable", "parameters": {"binary_data": True}}],
        }
    ).encode()
    records = json.dumps([{"tensor": row.tolist()} for row in x]).encode()
    wallaroo = f"/v1/api/pipelines/infer/{WS}/{PIPELINE}"
    binary_extra = f"Inference-Header-Content-Length: {len(header)}\r\n"
    return {
        "HTTP OIP JSON": _post(address, oip, "application/json", as_json),
        "HTTP OIP binary": _post(
            address, oip, "application/octet-stream", header + x.tobytes(), binary_extra
        ),
        "HTTP pandas-records": _post(
            address, wallaroo, "application/json; format=pandas-records", records
        ),
        "HTTP Arrow file": _post(
            address, wallaroo, "application/vnd.apache.arrow.file", _arrow_file(x)
        ),
    }


async def _closed_loop(
    connect: Callable[[], Awaitable[Callable[[], Awaitable[None]]]],
    concurrency: int,
    seconds: float,
) -> dict[str, Any]:
    """`concurrency` callers, each on its own connection, calling back to back."""
    calls = [await connect() for _ in range(concurrency)]
    for call in calls:
        for _ in range(WARM_UP):
            await call()
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def loop(call: Callable[[], Awaitable[None]]) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(loop(call) for call in calls))
    wall = time.perf_counter() - began
    latencies.sort()
    return {
        "requests": len(latencies),
        "warm_up": WARM_UP * concurrency,
        "requests_s": len(latencies) / wall,
        "p50_ms": latencies[len(latencies) // 2] * 1e3,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
    }


def _http_caller(
    address: str, request: bytes
) -> Callable[[], Awaitable[Callable[[], Awaitable[None]]]]:
    host, port = address.rsplit(":", 1)

    async def connect() -> Callable[[], Awaitable[None]]:
        reader, writer = await asyncio.open_connection(host, int(port), limit=2**20)

        async def call() -> None:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"HTTP answer {head[:200]!r}")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.lower().split(b"\r\n")
                if line.startswith(b"content-length:")
            )
            await reader.readexactly(length)

        return call

    return connect


def _grpc_caller(address: str, method: str, request: bytes) -> Any:
    async def connect() -> Callable[[], Awaitable[None]]:
        # One channel per caller, as each HTTP caller has its own connection.
        channel = grpc.aio.insecure_channel(address)
        stub: Any = channel.unary_unary(method)

        async def call() -> None:
            await stub(request, timeout=30)

        return call

    return connect


def _measure(pid: int, connect: Any, rows: int, concurrency: int, seconds: float) -> dict[str, Any]:
    before = _peers.cpu_seconds(pid)
    got = asyncio.run(_closed_loop(connect, concurrency, seconds))
    served = got["requests"] + got["warm_up"]
    got["server_cpu_us"] = (_peers.cpu_seconds(pid) - before) / max(served, 1) * 1e6
    got["rows_s"] = got["requests_s"] * rows
    return {"rows": rows, "concurrency": concurrency, **got}


def phase(
    models: dict[str, Path],
    tmp: Path,
    tables: dict[int, Any],
    seconds: float,
    peers: bool,
    log: Any,
) -> dict[str, Any]:
    rf = models["rf"]
    input_name = (
        ort.InferenceSession(str(rf), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    )
    cells: list[dict[str, Any]] = []
    with ExitStack() as stack:
        service, engine = stack.enter_context(_cells.service(tmp / "http", 1, {"rf": rf}))
        pid = service.processes["engine-1"].pid
        http = service.http_address("engine-1")
        kserve_http = ""
        if peers:
            _, kserve_pid, kserve_http = stack.enter_context(_peers.kserve_server(rf, 1, tmp, log))
        for rows, concurrency in CELLS:
            x = _cells.tensor(tables[rows])
            kinds: dict[str, tuple[int, Any]] = {
                "gRPC Infer (Arrow)": (
                    pid,
                    _grpc_caller(
                        engine,
                        INFER,
                        engine_pb2.InferRequest(
                            workspace=WS, pipeline=PIPELINE, arrow=_input.ipc_stream(tables[rows])
                        ).SerializeToString(),
                    ),
                ),
                "gRPC OIP": (
                    pid,
                    _grpc_caller(engine, _peers.MODEL_INFER, _peers.request_bytes(x, input_name)),
                ),
            }
            for kind, request in http_requests(x, http, input_name).items():
                kinds[kind] = (pid, _http_caller(http, request))
            if kserve_http:
                oip_json = http_requests(x, kserve_http, input_name)["HTTP OIP JSON"]
                kinds["KServe HTTP OIP JSON"] = (kserve_pid, _http_caller(kserve_http, oip_json))
            log(f"HTTP vs gRPC rows={rows} concurrency={concurrency}: {len(kinds)} kinds")
            for kind, (server_pid, connect) in kinds.items():
                cell = _measure(server_pid, connect, rows, concurrency, seconds)
                cells.append({"kind": kind, **cell})
    return {"cells": cells}


def summary(result: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## HTTP next to gRPC (one engine, rf; neutral clients on kept-alive connections)",
        "",
        "Ratios are against the gRPC call of the same kind of payload: OIP REST against OIP "
        "ModelInfer, Wallaroo's formats against the native Arrow Infer.",
        "",
        "| rows | concurrency | kind | req/s | p50 ms | p99 ms | engine CPU µs/req "
        "| req/s vs gRPC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rows, concurrency in CELLS:
        found = {
            c["kind"]: c
            for c in result["cells"]
            if (c["rows"], c["concurrency"]) == (rows, concurrency)
        }
        for kind, cell in found.items():
            base = found["gRPC OIP"] if "OIP" in kind else found["gRPC Infer (Arrow)"]
            lines.append(
                f"| {rows:,} | {concurrency} | {kind} | {cell['requests_s']:,.0f} "
                f"| {cell['p50_ms']:.3f} | {cell['p99_ms']:.3f} | {cell['server_cpu_us']:,.0f} "
                f"| {cell['requests_s'] / base['requests_s']:.2f} |"
            )
    return lines


def main() -> int:
    """`make bench-http`: this phase alone, written to bench/results/<date>-<host>-http."""
    import argparse
    import tempfile

    from bench import run

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peers", action="store_true", help="also KServe's REST port")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hotswap-bench-http-") as scratch:
        tmp = Path(scratch)
        tables = {n: run.rows_table(n) for n in (1, 1000)}
        result = phase(run.tutorial_models(tmp), tmp, tables, 4.0, args.peers, run.log)
    run.write_phase("http", "HTTP next to gRPC", result, summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
