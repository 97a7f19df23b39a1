"""The Open Inference Protocol side by side: the bare OIP twin, hotswap's engine and (with
`--peers`) KServe's ModelServer, driven by one neutral client with the same prebuilt requests,
with each server's CPU per request read from the OS (psutil). Also the SDK against in-process
ONNX Runtime.

The client sends serialized `ModelInferRequest` bytes (raw FP32 contents, as tritonclient does)
and does not parse answers, so its per-call cost is the RPC itself, alike for every server.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import psutil

import hotswap
from bench import _cells
from bench._cells import HERE, PIPELINE, WS
from hotswap.oip import grpc_service_pb2 as oip

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
SERVER_READY = "/inference.GRPCInferenceService/ServerReady"
PEERS_DIR = HERE / ".peers"
KSERVE = "kserve==0.21.*"


def request_bytes(x: np.ndarray, input_name: str, model: str = PIPELINE) -> bytes:
    return oip.ModelInferRequest(
        model_name=model,
        inputs=[
            oip.ModelInferRequest.InferInputTensor(
                name=input_name, datatype="FP32", shape=list(x.shape)
            )
        ],
        raw_input_contents=[np.ascontiguousarray(x, np.float32).tobytes()],
    ).SerializeToString()


async def _drive(address: str, body: bytes, concurrency: int, seconds: float) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        call: Any = channel.unary_unary(MODEL_INFER)
        for _ in range(20):  # connect and warm up
            await call(body, timeout=30)
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def loop() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                await call(body, timeout=30)
                latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        wall = time.perf_counter() - began
    latencies.sort()
    return {
        "requests": len(latencies),
        "requests_s": len(latencies) / wall,
        "p50_ms": latencies[len(latencies) // 2] * 1e3,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
    }


def cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its children (KServe's server may fork)."""
    process = psutil.Process(pid)
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def oip_cell(
    address: str, pid: int, x: np.ndarray, input_name: str, concurrency: int, seconds: float
) -> dict[str, Any]:
    body = request_bytes(x, input_name)
    before = cpu_seconds(pid)
    got = asyncio.run(_drive(address, body, concurrency, seconds))
    got["server_cpu_us"] = (cpu_seconds(pid) - before) / max(got["requests"] + 20, 1) * 1e6
    got["rows_s"] = got["requests_s"] * len(x)
    return {"rows": len(x), "concurrency": concurrency, **got}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(address: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        ready: Any = channel.unary_unary(SERVER_READY)
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server for {address} exited ({process.returncode})")
            try:
                ready(oip.ServerReadyRequest().SerializeToString(), timeout=2)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no OIP server answered at {address}") from None
                time.sleep(0.2)


def kserve_python(log: Any) -> Path:
    """A virtualenv of KServe's own (made once, kept in bench/.peers): never hotswap's."""
    venv = PEERS_DIR / "kserve"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if not stamp.is_file():
        log(f"installing {KSERVE} into {venv} (first run only)")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", KSERVE, "onnxruntime", "numpy"],
            check=True,
        )
        stamp.write_text(KSERVE)
    return python


@contextmanager
def kserve_server(model: Path, threads: int, tmp: Path, log: Any) -> Iterator[tuple[str, int, str]]:
    """KServe's ModelServer; yields its gRPC address, pid and REST address."""
    python = kserve_python(log)
    grpc_port, http_port = free_port(), free_port()
    out = (tmp / "kserve.log").open("wb")
    process = subprocess.Popen(
        [
            str(python),
            str(HERE / "peers" / "kserve_server.py"),
            str(model),
            "--name",
            PIPELINE,
            "--threads",
            str(threads),
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(http_port),
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": ""},
    )
    address = f"127.0.0.1:{grpc_port}"
    try:
        wait_ready(address, process)
        yield address, process.pid, f"127.0.0.1:{http_port}"
    finally:
        process.terminate()
        process.wait(15)
        out.close()


def sdk_cell(control: str, table: Any, seconds: float, exclude: tuple[str, ...]) -> dict[str, Any]:
    """Closed-loop `pipeline.infer` on `table` (one client thread), as a user calls it."""
    with hotswap.Client(control) as client:
        client.set_current_workspace(client.get_workspace(WS))
        pipeline = client.pipelines_by_name(PIPELINE)[0]
        for _ in range(3):
            pipeline.infer(table, dataset_exclude=list(exclude))
        count, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            pipeline.infer(table, dataset_exclude=list(exclude))
            count += 1
        wall = time.perf_counter() - began
    return {
        "rows": table.num_rows,
        "exclude": list(exclude),
        "requests_s": count / wall,
        "rows_s": count * table.num_rows / wall,
    }


# (rows, concurrency) of each OIP cell.
OIP_CELLS = ((1, 1), (1, 16), (1000, 4))


def phase(
    models: dict[str, Path],
    tmp: Path,
    tables: dict[int, Any],
    seconds: float,
    peers: bool,
    log: Any,
) -> dict[str, Any]:
    """Every OIP server up at once, each cell measured on them back to back; then the SDK."""
    rf = models["rf"]
    input_name = ort.InferenceSession(str(rf), providers=["CPUExecutionProvider"]).get_inputs()[0]
    tensors = {n: _cells.tensor(tables[n]) for n in (1, 1000)}
    out: dict[str, Any] = {"oip": [], "sdk": []}
    with ExitStack() as stack:
        servers: list[tuple[str, str, int]] = []
        for inline in (False, True):
            address = stack.enter_context(_cells.bare_server(rf, 1, tmp, inline=inline, oip=True))
            servers.append((f"bare{' inline' if inline else ''}", address, _pid_of(address)))
        service, engine = stack.enter_context(_cells.service(tmp / "oip", 1, {"rf": rf}))
        servers.append(("hotswap", engine, service.processes["engine-1"].pid))
        if peers:
            address, pid, _ = stack.enter_context(kserve_server(rf, 1, tmp, log))
            servers.append(("kserve", address, pid))
        for rows, concurrency in OIP_CELLS:
            log(f"OIP rows={rows} concurrency={concurrency}: {', '.join(s[0] for s in servers)}")
            for name, address, pid in servers:
                cell = oip_cell(address, pid, tensors[rows], input_name.name, concurrency, seconds)
                out["oip"].append({"server": name, **cell})
        log("SDK: pipeline.infer, 1,000 rows, with and without the inputs echoed back")
        for exclude in ((), ("in",)):
            # The floor is measured just before and after the cell: this machine's speed
            # drifts by a quarter over a run, so the first phase's floor would skew the ratio.
            before = _cells.floor(rf, tensors[1000], 1, 1.0)["rows_s"]
            cell = sdk_cell(service.control_address, tables[1000], seconds, exclude)
            after = _cells.floor(rf, tensors[1000], 1, 1.0)["rows_s"]
            out["sdk"].append(cell | {"floor_rows_s": (before + after) / 2})
    return out


def _pid_of(address: str) -> int:
    """The pid of the local process listening on `address`."""
    port = int(address.rsplit(":", 1)[1])
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            return int(conn.pid or 0)
    raise RuntimeError(f"no process listens on {address}")


def _cell(cells: list[dict[str, Any]], server: str, rows: int, concurrency: int) -> Any:
    return next(
        (
            c
            for c in cells
            if c["server"] == server and c["rows"] == rows and c["concurrency"] == concurrency
        ),
        None,
    )


def _bare(cells: list[dict[str, Any]], rows: int, concurrency: int, key: str) -> Any:
    both = [c for s in ("bare", "bare inline") if (c := _cell(cells, s, rows, concurrency))]
    return min(both, key=lambda c: c[key]) if key == "p50_ms" else max(both, key=lambda c: c[key])


def targets(p: dict[str, Any], floor_rows_s: float) -> list[tuple[str, str, str, bool]]:
    cells = p["oip"]
    out: list[tuple[str, str, str, bool]] = []
    for rows, concurrency, key, label in (
        (1, 16, "requests_s", "OIP 1-row req/s (c=16)"),
        (1000, 4, "rows_s", "OIP 1,000-row rows/s (c=4)"),
    ):
        b, h = _bare(cells, rows, concurrency, key), _cell(cells, "hotswap", rows, concurrency)
        ratio = h[key] / b[key]
        out.append(
            (
                f"{label} vs bare",
                f"{h[key]:,.0f} vs {b[key]:,.0f} = {ratio:.2f}x",
                ">= 0.95x",
                ratio >= 0.95,
            )
        )
        k = _cell(cells, "kserve", rows, concurrency)
        if k is not None:
            ratio = h[key] / k[key]
            out.append(
                (
                    f"{label} vs KServe",
                    f"{h[key]:,.0f} vs {k[key]:,.0f} = {ratio:.2f}x",
                    ">= 1.3x",
                    ratio >= 1.3,
                )
            )
    b, h = _bare(cells, 1, 1, "p50_ms"), _cell(cells, "hotswap", 1, 1)
    delta = h["p50_ms"] - b["p50_ms"]
    out.append(
        (
            "OIP 1-row p50, one client",
            f"{h['p50_ms']:.3f} vs {b['p50_ms']:.3f} ms (+{delta:.3f})",
            "<= bare + 0.1 ms",
            delta <= 0.1,
        )
    )
    k = _cell(cells, "kserve", 1, 1)
    if k is not None:
        out.append(
            (
                "OIP 1-row p50 vs KServe",
                f"{h['p50_ms']:.3f} vs {k['p50_ms']:.3f} ms",
                "below KServe",
                h["p50_ms"] < k["p50_ms"],
            )
        )
    for rows, concurrency in ((1, 16), (1000, 4)):
        b = _bare(cells, rows, concurrency, "requests_s")
        h = _cell(cells, "hotswap", rows, concurrency)
        ratio = h["server_cpu_us"] / b["server_cpu_us"]
        out.append(
            (
                f"server CPU per {rows:,}-row request vs bare",
                f"{h['server_cpu_us']:,.0f} vs {b['server_cpu_us']:,.0f} µs = {ratio:.2f}x",
                "<= 1.1x",
                ratio <= 1.1,
            )
        )

    def beside(c: dict[str, Any]) -> float:  # the floor measured beside the cell, if any
        return float(c.get("floor_rows_s", floor_rows_s))

    best = max(p["sdk"], key=lambda c: c["rows_s"] / beside(c))
    floor = beside(best)
    ratio = best["rows_s"] / floor
    excluded = f", dataset_exclude={best['exclude']}" if best["exclude"] else ""
    out.append(
        (
            f"SDK 1,000-row pipeline.infer vs in-process ORT{excluded}",
            f"{best['rows_s']:,.0f} vs {floor:,.0f} rows/s = {ratio:.2f}x",
            ">= 0.5x",
            ratio >= 0.5,
        )
    )
    return out


def summary(p: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Open Inference Protocol: bare twin, hotswap, peers (same client, same requests)",
        "",
        "| server | rows | conc | req/s | rows/s | p50 ms | p99 ms | server CPU µs/request |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in p["oip"]:
        lines.append(
            f"| {c['server']} | {c['rows']} | {c['concurrency']} | {c['requests_s']:,.0f} "
            f"| {c['rows_s']:,.0f} | {c['p50_ms']:.3f} | {c['p99_ms']:.3f} "
            f"| {c['server_cpu_us']:,.0f} |"
        )
    lines += [
        "",
        "## Through the SDK (pipeline.infer, one client thread, 1,000 rows)",
        "",
        "| dataset_exclude | req/s | rows/s | in-process ORT rows/s (just before and after) "
        "| ratio |",
        "|---|---|---|---|---|",
    ]
    for c in p["sdk"]:
        floor = c.get("floor_rows_s")
        beside = f"{floor:,.0f} | {c['rows_s'] / floor:.2f}x" if floor else "- | -"
        lines.append(
            f"| {c['exclude'] or '-'} | {c['requests_s']:,.1f} | {c['rows_s']:,.0f} | {beside} |"
        )
    return lines
