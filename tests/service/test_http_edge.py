"""The shared HTTP edge: a busy port fails the start as gRPC's does, engine processes share
one port on purpose, and answers go out without waiting on delayed ACKs."""

from __future__ import annotations

import asyncio
import socket

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from hotswap.service.edge import StartupError
from hotswap.service.http_edge import HttpServer, bind_socket, host_is_address


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
