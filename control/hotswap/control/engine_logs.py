"""Gathers a pipeline's inference logs from the engines and merges them, newest row first.

Every connected engine is asked in parallel, because an engine that served the pipeline
before a reassignment still holds its rows. The question goes over each engine's own Fleet
stream (a LogsQuery), never by dialling the address an engine claims: the caller's rights
were checked by the control plane, and no caller's token ever leaves it. An engine that does
not answer in time is reported, not fatal.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from hotswap.control.engine_port import EngineGone
from hotswap.control.errors import InvalidArgument
from hotswap.control.fleet import Fleet
from hotswap.service.log_tables import concat_logs
from hotswap.v1 import types_pb2

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 100
# Most rows one call gathers (each engine reads at most this many).
MAX_LIMIT = 100_000


class LogGatherer:
    def __init__(self, fleet: Fleet, timeout: float = 5.0) -> None:
        self._fleet = fleet
        self._timeout = timeout

    async def gather(self, request: types_pb2.GetLogsRequest) -> types_pb2.LogsResponse:
        if not 0 <= request.limit <= MAX_LIMIT:
            raise InvalidArgument(f"limit must be 0 (default {DEFAULT_LIMIT}) to {MAX_LIMIT}")
        limit = request.limit or DEFAULT_LIMIT
        engines = [s.name for s in self._fleet.connections.values() if s.connected]
        # Each engine returns at most `limit` rows: the newest `limit` overall are among them.
        ask = types_pb2.GetLogsRequest()
        ask.CopyFrom(request)
        ask.limit = limit
        answers = await asyncio.gather(
            *(
                self._fleet.query_logs(name, ask, uuid.uuid4().hex, self._timeout)
                for name in engines
            ),
            return_exceptions=True,
        )
        payloads: list[bytes] = []
        dropped = 0
        unreachable = []
        for name, answer in zip(engines, answers, strict=True):
            if isinstance(answer, EngineGone | TimeoutError):
                unreachable.append(f"{name}: {answer or 'no answer in time'}")
                continue
            if isinstance(answer, BaseException):
                raise answer
            dropped += answer.dropped_rows
            if answer.arrow:
                payloads.append(answer.arrow)
        if unreachable:
            log.warning("logs of %s: engines unreachable: %s", request.pipeline, unreachable)
        merged = await asyncio.to_thread(merge_newest_first, payloads, limit)
        return types_pb2.LogsResponse(arrow=merged, dropped_rows=dropped, unreachable=unreachable)


def merge_newest_first(payloads: list[bytes], limit: int) -> bytes:
    """Arrow IPC streams (each newest first) -> one stream of the newest `limit` rows."""
    tables = [ipc.open_stream(pa.py_buffer(p)).read_all() for p in payloads]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return b""
    if len(tables) == 1:
        table = tables[0]
    else:
        table = concat_logs(tables)
        # A stable sort keeps each engine's own newest-first order among equal times.
        order = pc.sort_indices(table, sort_keys=[("time", "descending")])
        table = table.take(order)
    table = table.slice(0, limit)
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())
