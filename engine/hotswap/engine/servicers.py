"""gRPC servicer of the engine: decode, call the domain, encode. Nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from hotswap.engine import _convert, access
from hotswap.engine.dataplane import DataPlane, Ran
from hotswap.engine.errors import (
    InvalidInput,
    ModelUnavailable,
    Overloaded,
    PipelineLoading,
    PipelineNotServed,
    RequestTooLarge,
)
from hotswap.engine.fast_ipc import read_request
from hotswap.engine.host import EngineHost
from hotswap.engine.inference_log import InferenceLog, encode
from hotswap.engine.runtime import LoadedPipeline, answer_parts, decode_ipc
from hotswap.service.edge import StatusTable, status_for, unary_errors
from hotswap.v1 import engine_pb2, engine_pb2_grpc, types_pb2

STATUS: StatusTable = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    PipelineNotServed: grpc.StatusCode.NOT_FOUND,
    PipelineLoading: grpc.StatusCode.UNAVAILABLE,
    ModelUnavailable: grpc.StatusCode.UNAVAILABLE,
    RequestTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    access.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    access.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}
unary = unary_errors(STATUS)

Context = grpc.aio.ServicerContext[Any, Any]
# Answers an InferStream keeps in flight at once; more requests wait (back-pressure).
STREAM_WINDOW = 64
# Most log rows one GetLogs returns (a bound on what one call makes the engine read).
MAX_LOG_ROWS = 100_000


def _run(loaded: LoadedPipeline, data: bytes, max_rows: int, exclude: frozenset[str]) -> Ran[bytes]:
    """Decode, infer, encode: one request, wholly on `loaded`."""
    start = time.perf_counter_ns()
    fast = read_request(data, max_rows)
    if fast is not None and loaded.takes(fast[1]):
        layout, columns = fast
        inferred = loaded.infer_arrays(columns, layout.schema)
        answer = loaded.answer(inferred, layout, exclude)
        # The logged rows hold views of the request: its bytes count against the log's bound.
        elapsed = time.perf_counter_ns() - start
        return Ran(answer, inferred, elapsed, len(answer) + len(data), inferred.shadows)
    table = decode_ipc(data, max_rows)
    result, shadows = loaded.infer_traced(table)
    out = loaded.encode(result, exclude)
    return Ran(out, result, time.perf_counter_ns() - start, len(out) + len(data), shadows)


def _answered_by(loaded: LoadedPipeline) -> engine_pb2.InferResponse:
    """The part of every answer of `loaded` that names it (built once per version)."""
    spec = loaded.spec
    return engine_pb2.InferResponse(
        workspace=spec.workspace,
        pipeline=spec.pipeline,
        pipeline_version=spec.number,
        pipeline_version_id=spec.version_id,
        models=_convert.served_models(loaded),
    )


def code_name(exc: Exception) -> str:
    """The status code name `exc` is answered with (the metrics' `code` label)."""
    code = status_for(STATUS, exc)
    return code.name if code is not None else "UNKNOWN"


class EngineServicer(engine_pb2_grpc.EngineServicer):
    def __init__(
        self,
        host: EngineHost,
        plane: DataPlane,
        state: EngineIdentity,
        *,
        inference_log: InferenceLog | None = None,
    ) -> None:
        self._host = host
        self._plane = plane
        self._log = inference_log
        self._identity = state

    async def _infer(self, request: engine_pb2.InferRequest) -> engine_pb2.InferResponse:
        caller = access.current.get()
        max_rows = self._plane.max_rows
        exclude = answer_parts(request.dataset_exclude)
        data = request.arrow  # read once: each read of a bytes field copies it
        served = await self._plane.serve(
            lambda: self._host.lookup(request.workspace, request.pipeline, caller.may_use),
            lambda loaded: _run(loaded, data, max_rows, exclude),
            nbytes=len(data),
            source=request.source,
        )
        response = engine_pb2.InferResponse()
        response.CopyFrom(served.loaded.kept(_answered_by))
        response.arrow = served.answer
        response.elapsed_ns = served.elapsed_ns
        response.request_id = request.request_id
        return response

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
