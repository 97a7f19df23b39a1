"""The shared HTTP edge: a busy port fails the start as gRPC's does, engine processes share
one port on purpose, and answers go out without waiting on delayed ACKs."""

from __future__ import annotations

import asyncio
import socket

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from hotswap.service import http_edge
from hotswap.service.edge import StartupError
from hotswap.service.http_edge import (
    TICK_SECONDS,
    BodyRefused,
    HttpServer,
    bind_socket,
    host_is_address,
    read_body,
)


def test_a_taken_port_is_a_startup_error_that_says_what_to_do() -> None:
    first = bind_socket("127.0.0.1:0")
    port = first.getsockname()[1]
    try:
        with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{port} for HTTP"):
            bind_socket(f"127.0.0.1:{port}")
    finally:
        first.close()


def test_reuse_port_shares_a_port_between_processes_of_one_engine() -> None:
    first = bind_socket("127.0.0.1:0", reuse_port=True)
    try:
        second = bind_socket(f"127.0.0.1:{first.getsockname()[1]}", reuse_port=True)
        second.close()
    finally:
        first.close()


def test_sockets_say_they_are_tcp_so_asyncio_sets_nodelay() -> None:
    sock = bind_socket("127.0.0.1:0")
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


async def test_serves_and_stops_inside_the_services_loop() -> None:
    async def hello(request: object) -> PlainTextResponse:
        return PlainTextResponse("hello")

    server = HttpServer(Starlette(routes=[Route("/", hello)]), "127.0.0.1:0")
    address = await server.start()
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET / HTTP/1.1\r\nHost: {address}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert await reader.readexactly(5) == b"hello"
    # The connection stays open for more requests until the server stops.
    await server.stop(grace=1.0)
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection(host, int(port))


async def _date_of(address: str) -> bytes:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET / HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
    dates = [line for line in head.split(b"\r\n") if line.lower().startswith(b"date:")]
    assert len(dates) == 1, head
    return dates[0]


def _empty_app() -> Starlette:
    return Starlette(routes=[Route("/", lambda request: PlainTextResponse(""))])


async def test_the_date_header_moves_on_though_the_server_ticks_once_a_second() -> None:
    """uvicorn ticks ten times a second and refreshes Date every tenth tick; this server
    ticks once a second, and each tick must still refresh it."""
    server = HttpServer(_empty_app(), "127.0.0.1:0")
    address = await server.start()
    first = await _date_of(address)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5 * TICK_SECONDS
    later = first
    while later == first and loop.time() < deadline:
        await asyncio.sleep(0.2)
        later = await _date_of(address)
    assert later != first, "the Date header was not refreshed within five ticks"
    await server.stop(grace=1.0)


async def test_a_stop_does_not_wait_for_the_next_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_edge, "TICK_SECONDS", 600.0)
    server = HttpServer(_empty_app(), "127.0.0.1:0")
    await server.start()
    await asyncio.wait_for(server.stop(grace=1.0), timeout=10)


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1:8080", True),
        ("127.0.0.1", True),
        ("[::1]:8080", True),
        ("[::1]", True),
        ("localhost:8080", True),
        ("LOCALHOST", True),
        ("10.1.2.3:80", True),
        ("evil.example:8080", False),
        ("127.0.0.1.evil.example", False),
        ("localhost.evil.example", False),
        ("[::1].evil.example:80", False),
        ("", False),
    ],
)
def test_host_is_address_refuses_dns_names(host: str, address: bool) -> None:
    assert host_is_address(host) is address


async def _echo_server(
    header_seconds: float = 10.0, max_per_client: int = 256
) -> tuple[HttpServer, str, int]:
    async def echo(request: Request) -> Response:
        try:
            body = await read_body(request, 1024, seconds=0.5)
        except BodyRefused as exc:
            return PlainTextResponse(str(exc), exc.status)
        return PlainTextResponse(body.decode())

    app = Starlette(routes=[Route("/", echo, methods=["POST"])])
    server = HttpServer(
        app, "127.0.0.1:0", header_seconds=header_seconds, max_per_client=max_per_client
    )
    host, port = (await server.start()).rsplit(":", 1)
    return server, host, int(port)


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the server closes the connection (EOF) within `seconds`."""
    try:
        return await asyncio.wait_for(reader.read(), seconds) == b""
    except TimeoutError:
        return False


async def test_a_request_must_send_its_headers_in_time() -> None:
    """Slowloris: a client sending half a request line and then nothing is cut off, so such
    clients cannot hold every connection slot; a whole request on a new connection is served."""
    server, host, port = await _echo_server(header_seconds=0.3)
    writers = []
    try:
        idle_reader, idle = await asyncio.open_connection(host, port)  # sends nothing at all
        reader, slow = await asyncio.open_connection(host, port)
        writers += [idle, slow]
        slow.write(b"POST / HT")
        assert await _closed_within(reader, 5)
        assert await _closed_within(idle_reader, 5)
        # A keep-alive connection whose second request stalls mid-headers is cut off too.
        reader, writer = await asyncio.open_connection(host, port)
        writers.append(writer)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert await reader.readexactly(2) == b"ok"
        writer.write(b"POST / HTTP/1.1\r\nHo")
        assert await _closed_within(reader, 5)
    finally:
        for writer in writers:
            writer.close()
        await server.stop(grace=0.5)


async def test_a_body_must_arrive_in_time() -> None:
    server, host, port = await _echo_server()
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 408")
        writer.close()
    finally:
        await server.stop(grace=0.5)


async def test_one_client_address_cannot_take_every_connection() -> None:
    server, host, port = await _echo_server(max_per_client=3)
    try:
        held = [await asyncio.open_connection(host, port) for _ in range(4)]
        assert await _closed_within(held[3][0], 5)  # the fourth from this address
        assert not await _closed_within(held[0][0], 0.2)  # the first three stay
        for _, writer in held:
            writer.close()
    finally:
        await server.stop(grace=0.5)
