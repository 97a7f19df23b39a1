"""Gathers a pipeline's inference logs from the engines and merges them, newest row first.

A gRPC client of ``Engine.GetLogs`` (edge code, like the engine's ``link.py``): every connected
engine is asked in parallel, because an engine that served the pipeline before a reassignment
still holds its rows. An engine that does not answer in time is reported, not fatal. The
caller's own bearer token is passed on, so engines apply the caller's workspace rights.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from hotswap._edge import channel_options
from hotswap._tables import concat_logs
from hotswap.control.fleet import Fleet
from hotswap.v1 import engine_pb2_grpc, types_pb2

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 100


class LogGatherer:
    def __init__(self, fleet: Fleet, timeout: float = 5.0) -> None:
        self._fleet = fleet
        self._timeout = timeout
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def _stub(self, address: str) -> engine_pb2_grpc.EngineStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=channel_options())
            self._channels[address] = channel
        return engine_pb2_grpc.EngineStub(channel)

    async def _ask(
        self, address: str, request: types_pb2.GetLogsRequest, authorization: str
    ) -> types_pb2.LogsResponse:
        metadata = (("authorization", authorization),) if authorization else ()
        return await self._stub(address).GetLogs(request, timeout=self._timeout, metadata=metadata)

    async def gather(
        self, request: types_pb2.GetLogsRequest, authorization: str = ""
    ) -> types_pb2.LogsResponse:
        limit = request.limit or DEFAULT_LIMIT
        sessions = [s for s in self._fleet.sessions.values() if s.connected and s.address]
        # Each engine returns at most `limit` rows: the newest `limit` overall are among them.
        ask = types_pb2.GetLogsRequest()
        ask.CopyFrom(request)
        ask.limit = limit
        answers = await asyncio.gather(
            *(self._ask(s.address, ask, authorization) for s in sessions), return_exceptions=True
        )
        payloads: list[bytes] = []
        dropped = 0
        unreachable = []
        for session, answer in zip(sessions, answers, strict=True):
            if isinstance(answer, grpc.aio.AioRpcError):
                unreachable.append(f"{session.name}: {answer.code().name} {answer.details()}")
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

    def forget_except(self, addresses: set[str]) -> None:
        """Closes channels to engines no longer known (the fleet forgot them)."""
        for address in [a for a in self._channels if a not in addresses]:
            channel = self._channels.pop(address)
            task = asyncio.ensure_future(channel.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


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
