"""gRPC servicer of the engine: decode, call the domain, encode. Nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc
import pyarrow as pa

from hotswap.engine import _convert, access
from hotswap.engine.errors import (
    InvalidInput,
    Overloaded,
    PipelineLoading,
    PipelineNotServed,
    RequestTooLarge,
)
from hotswap.engine.host import EngineHost
from hotswap.engine.inference_log import InferenceLog, encode
from hotswap.engine.metrics import Bound, EngineMetrics
from hotswap.engine.runtime import LoadedPipeline, decode_ipc, encode_ipc
from hotswap.service.edge import StatusTable, status_for, unary_errors
from hotswap.v1 import engine_pb2, engine_pb2_grpc, types_pb2

STATUS: StatusTable = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    PipelineNotServed: grpc.StatusCode.NOT_FOUND,
    PipelineLoading: grpc.StatusCode.UNAVAILABLE,
    RequestTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    access.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    access.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}
unary = unary_errors(STATUS)

Context = grpc.aio.ServicerContext[Any, Any]
_T = TypeVar("_T")
# Small requests run on the event loop only for pipelines whose 1-row inference takes less.
INLINE_MAX_MS = 0.5
# Answers an InferStream keeps in flight at once; more requests wait (back-pressure).
STREAM_WINDOW = 64
# Most log rows one GetLogs returns (a bound on what one call makes the engine read).
MAX_LOG_ROWS = 100_000


class InferenceQueue:
    """The inference threads, with a bound on the requests waiting for one: past it, a
    request is refused at once (RESOURCE_EXHAUSTED) instead of queued in memory without end."""

    def __init__(
        self, executor: Executor, max_queued: int, max_queued_bytes: int = 512 * 1024**2
    ) -> None:
        self._executor = executor
        self._max_queued = max_queued
        self._max_queued_bytes = max_queued_bytes
        self.queued = 0
        self.queued_bytes = 0

    async def run(self, fn: Callable[..., _T], *args: Any, nbytes: int = 0) -> _T:
        """Runs `fn(*args)` on an inference thread; `nbytes` is the request's size."""
        if self.queued >= self._max_queued or (
            self.queued and self.queued_bytes + nbytes > self._max_queued_bytes
        ):
            raise Overloaded(
                f"this engine is at capacity ({self.queued} requests, {self.queued_bytes} "
                "bytes waiting for an inference thread): retry with backoff, or serve on more "
                "engines"
            )
        self.queued += 1
        self.queued_bytes += nbytes
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self.queued -= 1
            self.queued_bytes -= nbytes


def _run(loaded: LoadedPipeline, data: bytes, max_rows: int) -> tuple[bytes, pa.Table, int]:
    """Decode, infer, encode: one request, wholly on `loaded`, in a worker thread."""
    start = time.perf_counter_ns()
    table = decode_ipc(data, max_rows)
    result = loaded.infer(table)
    out = encode_ipc(result)
    return out, result, time.perf_counter_ns() - start


class EngineServicer(engine_pb2_grpc.EngineServicer):
    def __init__(
        self,
        host: EngineHost,
        executor: InferenceQueue,
        state: EngineIdentity,
        max_rows: int,
        *,
        inline_bytes: int = 0,
        metrics: EngineMetrics | None = None,
        inference_log: InferenceLog | None = None,
    ) -> None:
        self._metrics = metrics or EngineMetrics()
        self._log = inference_log
        self._max_rows = max_rows
        self._inline_bytes = inline_bytes
        self._host = host
        self._executor = executor
        self._identity = state

    async def _infer(self, request: engine_pb2.InferRequest) -> engine_pb2.InferResponse:
        started = time.perf_counter()
        bound: Bound | None = None
        metrics = self._metrics
        metrics.in_flight.inc()
        try:
            # Looked up once: this request runs on this version even if a swap commits meanwhile.
            caller = access.current.get()
            loaded = self._host.lookup(request.workspace, request.pipeline, caller.may_use)
            bound = metrics.bind(loaded)
            if len(request.arrow) <= self._inline_bytes and loaded.row_ms < INLINE_MAX_MS:
                # Small request on a fast model: handing it to a thread and back costs more
                # than running it (tens of µs), so it runs here, keeping the loop's stall tiny.
                arrow, table, elapsed_ns = _run(loaded, request.arrow, self._max_rows)
            else:
                arrow, table, elapsed_ns = await self._executor.run(
                    _run, loaded, request.arrow, self._max_rows, nbytes=len(request.arrow)
                )
        except Exception as exc:
            code = status_for(STATUS, exc)
            metrics.failed(bound, code.name if code is not None else "UNKNOWN")
            raise
        except asyncio.CancelledError:
            metrics.failed(bound, "CANCELLED")
            raise
        finally:
            metrics.in_flight.dec()
        bound.ok.inc()
        bound.latency.observe(time.perf_counter() - started)
        bound.rows.inc(table.num_rows)
        if self._log is not None:
            # A reference to the finished table: the log copies nothing on this path.
            self._log.append(loaded, table, elapsed_ns, len(arrow), request.source)
        spec = loaded.spec
        return engine_pb2.InferResponse(
            arrow=arrow,
            workspace=spec.workspace,
            pipeline=spec.pipeline,
            pipeline_version=spec.number,
            pipeline_version_id=spec.version_id,
            models=_convert.served_models(loaded),
            elapsed_ns=elapsed_ns,
            request_id=request.request_id,
        )

    @unary
    async def Infer(
        self, request: engine_pb2.InferRequest, context: Context
    ) -> engine_pb2.InferResponse:
        return await self._infer(request)

    async def _answer(self, request: engine_pb2.InferRequest) -> engine_pb2.InferResponse:
        try:
            return await self._infer(request)
        except Exception as exc:
            code = status_for(STATUS, exc)
            if code is None:
                raise
            return engine_pb2.InferResponse(
                request_id=request.request_id,
                error_code=code.value[0],
                error_message=str(exc),
            )

    async def InferStream(
        self, request_iterator: AsyncIterator[engine_pb2.InferRequest], context: Context
    ) -> AsyncIterator[engine_pb2.InferResponse]:
        answers: asyncio.Queue[asyncio.Task[engine_pb2.InferResponse] | None] = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await window.acquire()
                    task = asyncio.create_task(self._answer(request))
                    task.add_done_callback(lambda t: answers.put_nowait(t))
            finally:
                # Holding every permit means every started answer has been yielded: end.
                for _ in range(STREAM_WINDOW):
                    await window.acquire()
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (task := await answers.get()) is not None:
                window.release()
                yield task.result()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    @unary
    async def GetLogs(
        self, request: types_pb2.GetLogsRequest, context: Context
    ) -> types_pb2.LogsResponse:
        return await self.logs(request, access.current.get().may_use)

    async def logs(
        self,
        request: types_pb2.GetLogsRequest,
        visible: Callable[[str], bool] = lambda workspace: True,
    ) -> types_pb2.LogsResponse:
        """The log rows `request` asks for, among the workspaces `visible` admits (also what
        the control plane's LogsQuery gets, over the fleet stream)."""
        if self._log is None:
            return types_pb2.LogsResponse()
        if not 0 <= request.limit <= MAX_LOG_ROWS:
            raise InvalidInput(f"limit must be 0 (default 100) to {MAX_LOG_ROWS}")
        table = await asyncio.to_thread(
            self._log.query,
            request.workspace,
            request.pipeline,
            request.limit or 100,
            request.start_ms,
            request.end_ms,
            visible,
        )
        arrow = await asyncio.to_thread(encode, table)
        return types_pb2.LogsResponse(arrow=arrow, dropped_rows=self._log.stats.dropped_rows)

    async def GetStatus(
        self, request: engine_pb2.GetEngineStatusRequest, context: Context
    ) -> engine_pb2.EngineState:
        caller = access.current.get()
        return engine_pb2.EngineState(
            name=self._identity.name,
            address=self._identity.address,
            connected=self._identity.connected(),
            pipelines=[
                _convert.serving_pipeline(s)
                for s in self._host.states()
                if caller.may_use(s.key.split("/", 1)[0])
            ],
        )


class EngineIdentity:
    """Who this engine is, as shown by GetStatus (known only once the port is bound)."""

    def __init__(self) -> None:
        self.name = ""
        self.address = ""
        self.connected: Callable[[], bool] = lambda: False
