"""Servicers are served by generic handlers: grpc.aio's server then keeps one pending call
request instead of one per registered method, which it waits on for every call it accepts."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from hotswap.service.edge import add_servicer

ROOT = Path(__file__).resolve().parents[2]
# Health has three methods (Check, Watch, List).
HEALTH_METHODS = len(health_pb2.DESCRIPTOR.services_by_name["Health"].methods)


def _call_requests() -> int:
    """The server's pending call requests (tasks of grpc.aio's AioServer._request*call)."""
    names = [getattr(t.get_coro(), "__qualname__", "") for t in asyncio.all_tasks()]
    return sum(name.startswith("AioServer._request") for name in names)


async def _serve(add: Callable[[grpc.aio.Server], Any]) -> tuple[int, int]:
    """(pending call requests once started, health status answered) of a server set up by
    `add`."""
    server = grpc.aio.server()
    add(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub: Any = health_pb2_grpc.HealthStub(channel)
            answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        return _call_requests(), answer.status
    finally:
        await server.stop(None)


async def test_add_servicer_serves_every_method_from_one_pending_call_request() -> None:
    def generated(server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)

    def ours(server: grpc.aio.Server) -> None:
        add_servicer(
            server, health_pb2_grpc.add_HealthServicer_to_server, health.aio.HealthServicer()
        )

    registered, status = await _serve(generated)
    assert (registered, status) == (HEALTH_METHODS + 1, health_pb2.HealthCheckResponse.SERVING)
    generic, status = await _serve(ours)
    assert (generic, status) == (1, health_pb2.HealthCheckResponse.SERVING)


def test_every_servicer_of_the_project_is_added_through_add_servicer() -> None:
    """A generated add_*_to_server called on a server directly registers its methods again."""
    direct = re.compile(r"add_\w+_to_server\(")
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for top in ("engine", "control", "clients", "protos")
        for path in (ROOT / top).rglob("*.py")
        if not path.name.endswith("_pb2_grpc.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if direct.search(line)
    ]
    assert found == []
