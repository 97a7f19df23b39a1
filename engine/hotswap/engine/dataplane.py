"""The engine's one request path, for every protocol (native Infer/InferStream, OIP).

A servicer translates its protocol into two callables, `lookup` (which loaded version serves
this request) and `run` (decode, infer, encode, on that version), and `DataPlane.serve` does
the rest the same way for all of them: look the version up once (so the request is served
wholly by it, even if a swap commits meanwhile), run it inline on the event loop or on an
inference thread by its measured cost, bound the queue, count it in the metrics, and append
it to the inference log. No grpc here: servicers map the errors to status codes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from hotswap.engine.errors import Overloaded, RequestTooLarge
from hotswap.engine.inference_log import InferenceLog
from hotswap.engine.metrics import Bound, EngineMetrics
from hotswap.engine.runtime import LoadedPipeline, LogRows, Shadows

_T = TypeVar("_T")
# Small requests run on the event loop only for pipelines whose 1-row inference takes less.
INLINE_MAX_MS = 0.5


def check_rows(rows: int, max_rows: int) -> None:
    """Raises RequestTooLarge past the engine's row limit, with what to do about it."""
    if rows > max_rows:
        raise RequestTooLarge(
            f"the request has {rows} rows; this engine takes at most {max_rows} per call "
            "(split it into batches, or raise --max-rows)"
        )


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


# Ran and Served are made for every request, so not frozen: a frozen dataclass's __init__
# costs ~5x as much. Nothing changes them after.
@dataclass(slots=True)
class Ran(Generic[_T]):
    """What `run` returns: the protocol's answer, the result rows (logged), the time spent,
    the answer's size in bytes (what the log's memory bound counts) and the shadow runs the
    log is to make (a version with a shadow step)."""

    answer: _T
    table: LogRows
    elapsed_ns: int
    size: int
    shadows: Shadows | None = None


@dataclass(slots=True)
class Served(Generic[_T]):
    loaded: LoadedPipeline
    answer: _T
    elapsed_ns: int


class DataPlane:
    def __init__(
        self,
        queue: InferenceQueue,
        metrics: EngineMetrics,
        inference_log: InferenceLog | None,
        *,
        max_rows: int,
        inline_bytes: int = 0,
        code_of: Callable[[Exception], str] = lambda exc: "UNKNOWN",
    ) -> None:
        # The status code name a failure is counted under (the edge knows the codes).
        self._code_of = code_of
        self._queue = queue
        self._metrics = metrics
        self._log = inference_log
        self.max_rows = max_rows
        self._inline_bytes = inline_bytes

    async def serve(
        self,
        lookup: Callable[[], LoadedPipeline],
        run: Callable[[LoadedPipeline], Ran[_T]],
        *,
        nbytes: int,
        source: str = "",
    ) -> Served[_T]:
        """One request. `nbytes` is its size: small requests on fast models run inline,
        because handing them to a thread and back costs more than running them."""
        started = time.perf_counter()
        metrics, bound = self._metrics, None
        metrics.in_flight += 1
        try:
            loaded = lookup()
            bound = metrics.bind(loaded)
            # A model in a process of its own is waited for on a thread: the loop serves on.
            inline = not loaded.isolated and loaded.row_ms < INLINE_MAX_MS
            if nbytes <= self._inline_bytes and inline:
                ran = run(loaded)
            else:
                ran = await self._queue.run(run, loaded, nbytes=nbytes)
        except BaseException as exc:
            self._count_failure(bound, exc)
            raise
        finally:
            metrics.in_flight -= 1
        bound.served(time.perf_counter() - started, ran.table.num_rows)
        if self._log is not None:
            # A reference to the finished rows: the log copies nothing on this path.
            self._log.append(loaded, ran.table, ran.elapsed_ns, ran.size, source, ran.shadows)
        return Served(loaded, ran.answer, ran.elapsed_ns)

    def _count_failure(self, bound: Bound | None, exc: BaseException) -> None:
        if isinstance(exc, asyncio.CancelledError):
            self._metrics.failed(bound, "CANCELLED")
        elif isinstance(exc, Exception):
            self._metrics.failed(bound, self._code_of(exc))
