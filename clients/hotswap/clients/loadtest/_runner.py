"""The load generator: one asyncio loop per client process, N concurrent calls in each.

Closed loop: `concurrency` tasks, each sending its next request when the last one answers.
Open loop: requests are sent on a fixed schedule and latency is measured from the *intended*
send time, so a stalled server shows up as latency instead of silently lowering the rate
(coordinated omission). Samples go into per-slice histograms (`slice_s` wide, keyed by send
time), which is what swap windows and the latency-over-time plot are computed from.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import queue
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from hotswap.clients._rpc import Security, aio_channel, bearer
from hotswap.clients.loadtest._histogram import Histogram
from hotswap.v1 import engine_pb2

BARE_METHOD = "/bare.Bare/Infer"
INFER_METHOD = "/hotswap.v1.Engine/Infer"
MAX_OUTSTANDING = 4096  # open loop: beyond this, wait (latency still counts from schedule)


# The inference log marks these rows (`metadata.source`), so they are told from real traffic.
SOURCE = "loadtest"


@dataclass(frozen=True)
class Target:
    """Where requests go: hotswap engines (Infer RPC) or the bare reference (raw bytes)."""

    addresses: tuple[str, ...]
    workspace: str = ""
    pipeline: str = ""
    bare: bool = False
    security: Security = field(
        default_factory=Security
    )  # TLS and/or bearer token (hotswap.Client's settings)


@dataclass(frozen=True)
class LoadSpec:
    target: Target
    body: bytes
    rows: int
    concurrency: int = 1
    rate: float = 0.0  # total requests/s over all processes; 0 = closed loop
    duration: float | None = None
    requests: int | None = None
    processes: int = 1
    slice_s: float = 0.05
    timeout: float = 30.0
    # Connections per address in each client process (an engine with --processes N serves
    # each connection from one of its processes: open at least N to reach them all).
    connections: int = 1


@dataclass
class Shared:
    """Cross-process state: a stop flag and per-worker (done, errors) progress counters."""

    stop: Any
    progress: Any

    @classmethod
    def make(cls, ctx: Any, workers: int) -> Shared:
        return cls(ctx.RawValue("b", 0), ctx.RawArray("q", 2 * workers))

    def done(self) -> tuple[int, int]:
        values = list(self.progress)
        return sum(values[0::2]), sum(values[1::2])


@dataclass
class WorkerResult:
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    versions: dict[int, int] = field(default_factory=dict)
    histogram: Histogram = field(default_factory=Histogram)
    slices: dict[int, Histogram] = field(default_factory=dict)
    cpu_s: float = 0.0
    wall_s: float = 0.0
    max_rss_kb: int = 0

    def merge(self, other: WorkerResult) -> None:
        self.ok += other.ok
        for code, n in other.errors.items():
            self.errors[code] = self.errors.get(code, 0) + n
        for version, n in other.versions.items():
            self.versions[version] = self.versions.get(version, 0) + n
        self.histogram.merge(other.histogram)
        for index, part in other.slices.items():
            self.slices.setdefault(index, Histogram()).merge(part)
        self.cpu_s += other.cpu_s
        self.wall_s = max(self.wall_s, other.wall_s)
        self.max_rss_kb = max(self.max_rss_kb, other.max_rss_kb)


def _caller(spec: LoadSpec, channels: list[grpc.aio.Channel]) -> list[Callable[[], Awaitable[int]]]:
    """One zero-argument coroutine factory per address; each returns the serving version."""
    calls: list[Callable[[], Awaitable[int]]] = []
    auth = bearer(spec.target.security)
    for channel in channels:
        if spec.target.bare:
            method: Any = channel.unary_unary(BARE_METHOD)

            async def bare(method: Any = method) -> int:
                await method(spec.body, timeout=spec.timeout, metadata=auth)
                return 0

            calls.append(bare)
        else:
            # The request never changes: serialize it once, so the client's per-call cost is
            # the RPC itself (as for the bare reference, which sends raw bytes).
            method = channel.unary_unary(
                INFER_METHOD, response_deserializer=engine_pb2.InferResponse.FromString
            )
            request = engine_pb2.InferRequest(
                workspace=spec.target.workspace,
                pipeline=spec.target.pipeline,
                arrow=spec.body,
                source=SOURCE,
            ).SerializeToString()

            async def infer(method: Any = method, request: bytes = request) -> int:
                response = await method(request, timeout=spec.timeout, metadata=auth)
                return int(response.pipeline_version)

            calls.append(infer)
    return calls


async def _drive(
    spec: LoadSpec, worker: int, quota: int | None, t0: float, shared: Shared
) -> WorkerResult:
    result = WorkerResult()
    own = spec.connections > 1
    channels = [
        aio_channel(a, spec.target.security, own)
        for a in spec.target.addresses
        for _ in range(spec.connections)
    ]
    calls = _caller(spec, channels)
    end = t0 + spec.duration if spec.duration is not None else float("inf")
    issued = 0
    slot = 2 * worker

    async def one(started: float) -> None:
        nonlocal issued
        call = calls[issued % len(calls)]
        issued += 1
        try:
            version = await call()
        except grpc.aio.AioRpcError as exc:
            name = exc.code().name
            result.errors[name] = result.errors.get(name, 0) + 1
            shared.progress[slot + 1] += 1
            return
        now = time.monotonic()
        micros = int((now - started) * 1e6)
        result.histogram.record(micros)
        index = int((started - t0) / spec.slice_s)
        part = result.slices.get(index)
        if part is None:
            part = result.slices[index] = Histogram()
        part.record(micros)
        result.versions[version] = result.versions.get(version, 0) + 1
        result.ok += 1
        shared.progress[slot] += 1

    def more() -> bool:
        return (
            not shared.stop.value and (quota is None or issued < quota) and time.monotonic() < end
        )

    delay = t0 - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    cpu0, wall0 = time.process_time(), time.monotonic()
    if spec.rate <= 0:

        async def closed() -> None:
            while more():
                await one(time.monotonic())

        await asyncio.gather(*(closed() for _ in range(spec.concurrency)))
    else:
        per_process = spec.rate / spec.processes
        interval = 1.0 / per_process
        start = t0 + interval * worker / spec.processes  # stagger the processes' schedules
        pending: set[asyncio.Task[None]] = set()
        n = 0
        while more():
            intended = start + n * interval
            if intended >= end:
                break
            wait = intended - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            while len(pending) >= MAX_OUTSTANDING:
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            task = asyncio.create_task(one(intended))
            pending.add(task)
            task.add_done_callback(pending.discard)
            n += 1
        if pending:
            await asyncio.wait(pending)
    result.cpu_s = time.process_time() - cpu0
    result.wall_s = time.monotonic() - wall0
    result.max_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for channel in channels:
        await channel.close()
    return result


def _quota(spec: LoadSpec, worker: int) -> int | None:
    if spec.requests is None:
        return None
    share, extra = divmod(spec.requests, spec.processes)
    return share + (1 if worker < extra else 0)


def _child(
    spec: LoadSpec, worker: int, shared: Shared, ready: Any, go: Any, t0: Any, out: Any
) -> None:
    ready.put(os.getpid())
    go.wait()
    result = asyncio.run(_drive(spec, worker, _quota(spec, worker), t0.value, shared))
    out.put((worker, result))


class Load:
    """A started load: `t0` (monotonic), `shared`, and `wait()` for the merged result."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self._ctx = multiprocessing.get_context("spawn")  # no fork after gRPC threads exist
        self.shared = Shared.make(self._ctx, spec.processes)
        self.t0 = 0.0
        self._processes: list[Any] = []
        self._out: Any = None

    def start_children(self) -> None:
        """Spawns processes (P > 1) and waits until all are ready, then fixes `t0`."""
        if self.spec.processes == 1:
            self.t0 = time.monotonic() + 0.01
            return
        ready, go, self._out = self._ctx.Queue(), self._ctx.Event(), self._ctx.Queue()
        t0 = self._ctx.RawValue("d", 0.0)
        for worker in range(self.spec.processes):
            process = self._ctx.Process(
                target=_child, args=(self.spec, worker, self.shared, ready, go, t0, self._out)
            )
            process.start()
            self._processes.append(process)
        waiting, deadline = len(self._processes), time.monotonic() + 60
        while waiting:
            # Poll so a child that dies while starting fails the run instead of hanging it.
            try:
                ready.get(timeout=0.2)
                waiting -= 1
            except queue.Empty:
                dead = [p.exitcode for p in self._processes if p.exitcode is not None]
                if dead or time.monotonic() > deadline:
                    self.shared.stop.value = 1
                    for process in self._processes:
                        process.kill()
                    raise RuntimeError(f"load clients failed to start (exit {dead})") from None
        self.t0 = t0.value = time.monotonic() + 0.05
        go.set()

    def wait(self) -> WorkerResult:
        if self.spec.processes == 1:
            return asyncio.run(_drive(self.spec, 0, _quota(self.spec, 0), self.t0, self.shared))
        merged = WorkerResult()
        for _ in self._processes:
            _, part = self._out.get()
            merged.merge(part)
        for process in self._processes:
            process.join()
        return merged
