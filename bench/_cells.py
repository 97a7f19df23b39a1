"""Measurement building blocks: the in-process floor, servers to drive, and one load cell."""

from __future__ import annotations

import hashlib
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from hotswap.clients._rpc import Security, open_channel
from hotswap.clients._stack import LocalStack
from hotswap.clients.loadtest import LoadSpec, SwapPlan, Target, _input, run_load
from hotswap.v1 import control_pb2 as c
from hotswap.v1 import control_pb2_grpc as cg

WS = "bench"
PIPELINE = "housing"
HERE = Path(__file__).resolve().parent


def tensor(table: Any) -> npt.NDArray[np.float32]:
    """A `tensor` column's rows as the float32 matrix the bare servers and ORT take."""
    return np.frombuffer(_input.raw_tensor(table), np.float32).reshape(table.num_rows, -1)


def floor(
    model: Path, x: npt.NDArray[np.float32], threads: int, seconds: float
) -> dict[str, float]:
    """In-process ONNX Runtime on batch `x`: per-call p50 and rows/s."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    session.run(None, feed)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t)
    total = sum(times)
    return {
        "p50_ms": statistics.median(times) * 1e3,
        "requests_s": len(times) / total,
        "rows_s": len(times) * len(x) / total,
        "calls": len(times),
    }


@contextmanager
def bare_server(
    model: Path,
    threads: int,
    tmp: Path,
    width: int = 18,
    inline: bool = False,
    oip: bool = False,
) -> Iterator[str]:
    address_file = tmp / f"bare-{threads}-{inline}-{oip}.address"
    address_file.unlink(missing_ok=True)
    process = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "bare_server.py"),
            str(model),
            "--width",
            str(width),
            "--threads",
            str(threads),
            "--address-file",
            str(address_file),
            *(["--inline"] if inline else []),
            *(["--oip"] if oip else []),
        ],
        cwd=HERE.parent,  # `hotswap` is installed; the OIP messages come from it
    )
    try:
        deadline = time.monotonic() + 30
        while not address_file.is_file() or not address_file.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("bare server did not start")
            time.sleep(0.02)
        yield address_file.read_text().strip()
    finally:
        process.terminate()
        process.wait(10)


def control(stack: LocalStack, token: str | None = None) -> Any:
    channel = open_channel(stack.control_address, Security(token=token))
    return cg.ControlPlaneStub(channel)  # type: ignore[arg-type]


def upload(stub: Any, name: str, path: Path) -> None:
    data = path.read_bytes()

    def chunks() -> Iterator[c.UploadModelRequest]:
        yield c.UploadModelRequest(
            header=c.UploadModelHeader(
                workspace=WS,
                name=name,
                sha256=hashlib.sha256(data).hexdigest(),
                size_bytes=len(data),
            )
        )
        for i in range(0, len(data), 1 << 20):
            yield c.UploadModelRequest(chunk=data[i : i + (1 << 20)])

    stub.UploadModel(chunks(), timeout=300)


def deploy(stub: Any, model: str) -> Any:
    version = stub.CreatePipelineVersion(
        c.CreatePipelineVersionRequest(
            workspace=WS, pipeline=PIPELINE, steps=[c.StepRef(model=model)]
        )
    )
    return stub.Deploy(
        c.DeployRequest(workspace=WS, pipeline=PIPELINE, version=version.number), timeout=300
    )


@contextmanager
def service_address(
    tmp: Path, threads: int, models: dict[str, Path], engine_args: tuple[str, ...] = ()
) -> Iterator[str]:
    with service(tmp, threads, models, engine_args) as (_, engine):
        yield engine


@contextmanager
def service(
    tmp: Path,
    threads: int,
    models: dict[str, Path],
    engine_args: tuple[str, ...] = (),
    control_args: tuple[str, ...] = (),
    token: str | None = None,
) -> Iterator[tuple[LocalStack, str]]:
    """A one-engine stack serving PIPELINE with the first of `models`; yields (stack, engine).
    With `token`, the stack's own calls carry it (for a stack run with a token file)."""
    with LocalStack(
        tmp / f"stack-{threads}",
        engines=1,
        threads=threads,
        engine_args=engine_args,
        control_args=control_args,
        security=Security(token=token),
    ) as stack:
        stub = control(stack, token)
        stub.CreateWorkspace(c.CreateWorkspaceRequest(name=WS))
        for name, path in models.items():
            upload(stub, name, path)
        stub.CreatePipeline(c.CreatePipelineRequest(workspace=WS, name=PIPELINE))
        deploy(stub, next(iter(models)))
        found = stub.GetPipelineEndpoints(
            c.GetPipelineEndpointsRequest(workspace=WS, pipeline=PIPELINE)
        )
        yield stack, found.addresses[0]


def cell(
    address: str,
    bare: bool,
    table: Any,
    concurrency: int,
    seconds: float,
    processes: int = 1,
    token: str | None = None,
    connections: int = 1,
) -> dict[str, Any]:
    """One closed-loop measurement; the figures the summary needs, not the whole report."""
    body = _input.raw_tensor(table) if bare else _input.ipc_stream(table)
    target = Target((address,), WS, PIPELINE, bare=bare, security=Security(token=token))
    report = run_load(
        LoadSpec(
            target,
            body,
            table.num_rows,
            concurrency=concurrency,
            duration=seconds,
            processes=processes,
            connections=connections,
        ),
        progress=False,
    )
    lat = report["latency_ms"]
    return {
        "rows": table.num_rows,
        "concurrency": concurrency,
        "processes": processes,
        "requests_s": report["throughput"]["requests_s"],
        "rows_s": report["throughput"]["rows_s"],
        "p50_ms": lat["p50"],
        "p99_ms": lat["p99"],
        "max_ms": lat["max"],
        "errors": sum(report["errors"].values()),
        "harness_cpu_pct": report["harness"]["cpu_pct_of_one_core"],
    }


def swap_run(
    engine: str,
    control_address: str,
    table: Any,
    rate: float,
    plan: SwapPlan,
    window_s: float = 0.25,
) -> dict[str, Any]:
    """Open-loop load at `rate` while `plan` swaps; ends shortly after the last swap."""
    spec = _open_loop(engine, table, rate, None)
    plan.control, plan.workspace, plan.pipeline, plan.stop_load_after = (
        control_address,
        WS,
        PIPELINE,
        True,
    )
    return run_load(spec, plan, window_s=window_s, progress=False)


def quiet_worst_ms(engine: str, table: Any, rate: float, seconds: float, runs: int) -> list[float]:
    """The worst latency of each of `runs` open-loop runs of `seconds` with no swap: the
    control for a swap window of that length (the worst of more requests is worse)."""
    spec = _open_loop(engine, table, rate, seconds)
    return [run_load(spec, progress=False)["latency_ms"]["max"] for _ in range(runs)]


def _open_loop(engine: str, table: Any, rate: float, seconds: float | None) -> LoadSpec:
    """Native `Infer` of `table` at `rate` requests/s, for `seconds` (None: until stopped)."""
    return LoadSpec(
        Target((engine,), WS, PIPELINE),
        _input.ipc_stream(table),
        table.num_rows,
        rate=rate,
        duration=seconds,
        requests=None,
    )


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
