"""Shared gRPC edge helpers: mapping domain errors to status codes, and channel options.

Lives beside the generated ``hotswap.v1`` code because both servers (control plane and engine)
use it and neither should import the other. Domain code never imports this module.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import ipaddress
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc

from hotswap.service.supervisor import Supervisor

Request = TypeVar("Request")
Response = TypeVar("Response")
StatusTable = Mapping[type[Exception], grpc.StatusCode]

# gRPC's 4 MiB default is too small for large Arrow batches.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_CONCURRENT_STREAMS = 1024


def status_for(table: StatusTable, exc: Exception) -> grpc.StatusCode | None:
    """The code of the most specific class in `table` that `exc` is an instance of."""
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]
    return None


def unary_errors(
    table: StatusTable,
) -> Callable[
    [Callable[[Any, Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[Response]]],
    Callable[[Any, Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[Response]],
]:
    """Decorates a unary (or client-streaming) servicer method: a domain error listed in
    `table` becomes its status code with the error's message; anything else propagates (grpc
    logs it and answers UNKNOWN)."""

    def decorate(
        method: Callable[[Any, Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[Response]],
    ) -> Callable[[Any, Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[Response]]:
        @functools.wraps(method)
        async def wrapper(
            self: Any, request: Request, context: grpc.aio.ServicerContext[Any, Any]
        ) -> Response:
            try:
                return await method(self, request, context)
            except Exception as exc:
                await _abort_for(table, exc, context)
                raise  # not in the table: grpc answers UNKNOWN and logs it

        return wrapper

    return decorate


def stream_errors(
    table: StatusTable,
) -> Callable[
    [Callable[[Any, Request, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Response]]],
    Callable[[Any, Request, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Response]],
]:
    """Like `unary_errors`, for server-streaming methods (async generators)."""

    def decorate(
        method: Callable[
            [Any, Request, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Response]
        ],
    ) -> Callable[[Any, Request, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Response]]:
        @functools.wraps(method)
        async def wrapper(
            self: Any, request: Request, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Response]:
            try:
                async for item in method(self, request, context):
                    yield item
            except Exception as exc:
                await _abort_for(table, exc, context)
                raise

        return wrapper

    return decorate


async def _abort_for(
    table: StatusTable, exc: Exception, context: grpc.aio.ServicerContext[Any, Any]
) -> None:
    """Ends the call with `exc`'s status and message when the table maps it (abort raises);
    returns for an exception the table does not know, which the caller re-raises."""
    code = status_for(table, exc)
    if code is not None:
        await context.abort(code, str(exc))


def server_options(
    max_message_bytes: int = MAX_MESSAGE_BYTES, reuse_port: bool = False
) -> list[tuple[str, int]]:
    """`reuse_port` only for the processes of one engine, which share its port on purpose."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Bounds what one connection can make the server hold at once.
        ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS),
        # Let clients keep idle connections open with keepalive pings.
        ("grpc.keepalive_permit_without_calls", 1),
        # Clients ping every 2 s while a call is open (clients/_rpc.py KEEPALIVE_MS); a
        # slower server limit would answer a long call's pings with GOAWAY.
        ("grpc.http2.min_ping_interval_without_data_ms", 1000),
        # gRPC turns SO_REUSEPORT on by default: a second server on a taken port would then
        # bind it too and the kernel would split connections between the two.
        ("grpc.so_reuseport", int(reuse_port)),
    ]


Servicer = TypeVar("Servicer")


def add_servicer(
    server: grpc.aio.Server, add: Callable[[Servicer, Any], None], servicer: Servicer
) -> None:
    """Adds `servicer` to `server` with a generated ``add_*Servicer_to_server`` (`add`), its
    methods served by the generic handler that function makes, not as registered methods.

    Why: for every call it accepts, grpc.aio's server waits (``asyncio.wait``) on one pending
    call request per registered method plus one for the generic handlers, so each call costs
    Python work in proportion to the registered methods: the engine's Health, reflection,
    Engine and OIP services have 15, the control plane's 26. Served generically (one pending
    request, then a dict look-up per service), the engine answered 5-16 % more 1-row calls a
    second at 4-12 % less CPU each (docs/adr/0003).
    """
    add(servicer, _GenericHandlersOnly(server))


class _GenericHandlersOnly:
    """The server as a generated ``add_*Servicer_to_server`` sees it: it passes the methods'
    handlers twice, once as a generic handler and once to register; the second is dropped."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        """The same handlers the generic one holds: nothing to add."""


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 10000),
        ("grpc.keepalive_timeout_ms", 5000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def server_credentials(
    cert: Path | None, key: Path | None, client_ca: Path | None
) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files, or None for plaintext. With `client_ca`, every client
    must present a certificate signed by it (mutual TLS)."""
    if cert is None and key is None:
        if client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )


def bind(server: grpc.aio.Server, listen: str, credentials: grpc.ServerCredentials | None) -> int:
    """Binds `listen` (port 0 picks one) with or without TLS; returns the port.

    Raises:
        StartupError: the port is taken (servers bind without SO_REUSEPORT) or the address
            is not one of this host's.
    """
    try:
        if credentials is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise StartupError(
            f"cannot listen on {listen}: the port is in use by another process (another "
            "hotswap server?) or the address is not this host's; stop the other process or "
            "choose another port"
        )
    return port


def env_flag(value: str | None) -> bool:
    """A yes/no HOTSWAP_* variable: "1", "true" or "yes" (any case) is yes."""
    return (value or "").strip().lower() in ("1", "true", "yes")


def add_server_flags(
    parser: argparse.ArgumentParser,
    env: Callable[[str], str | None],
    *,
    metrics_host: str,
    max_concurrent_rpcs: int,
) -> None:
    """The flags both servers take the same way: where metrics and the health-only port
    bind, and the RPC limit."""
    parser.add_argument(
        "--health-listen",
        default=env("HOTSWAP_HEALTH_LISTEN") or "",
        help="also answer gRPC health checks alone, in plaintext, on this host:port: for "
        "probes that speak no TLS, such as Kubernetes' (default: off)",
    )
    parser.add_argument(
        "--metrics-host",
        default=env("HOTSWAP_METRICS_HOST") or metrics_host,
        help="address the metrics endpoint binds (default %(default)s: loopback only)",
    )
    parser.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=int(env("HOTSWAP_MAX_CONCURRENT_RPCS") or max_concurrent_rpcs),
        help="RPCs served at once, beyond which calls get RESOURCE_EXHAUSTED; 0 = no limit "
        "(%(default)s)",
    )


def is_loopback(address: str) -> bool:
    """Whether host:port names this machine's loopback (where cleartext never leaves it)."""
    host = address.rsplit(":", 1)[0].strip("[]").lower()
    for prefix in ("dns:///", "ipv4:", "ipv6:"):
        host = host.removeprefix(prefix)
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class StartupError(Exception):
    """A server could not start (a busy port, a data dir in use, an unreadable file)."""


def client_channel(
    address: str,
    *,
    ca: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
) -> grpc.aio.Channel:
    """An aio channel; TLS when `ca` is given (plus a client certificate for mutual TLS)."""
    if ca is None:
        return grpc.aio.insecure_channel(address, options=channel_options())
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    return grpc.aio.secure_channel(address, credentials, options=channel_options())


class Service(Protocol):
    supervisor: Supervisor

    async def start(self) -> str: ...

    async def drain(self) -> None:
        """Before a signalled stop: hand work to others (engines), or nothing."""
        ...

    async def stop(self, grace: float = ...) -> None: ...


async def serve_until_signalled(make: Callable[[], Service], name: str) -> None:
    """Builds the service inside the running loop, serves until SIGINT/SIGTERM, then stops
    it gracefully (in-flight requests finish). A crashed background task stops it too, and
    raises StartupError saying which, so the process exits non-zero."""
    try:
        service = make()
        await service.start()
    except (OSError, ValueError) as exc:  # files and addresses from the settings
        raise StartupError(str(exc)) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    signalled: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    crashed: asyncio.Future[Any] = service.supervisor.crashed
    await asyncio.wait([signalled, crashed], return_when=asyncio.FIRST_COMPLETED)
    signalled.cancel()
    logging.getLogger(name).info("shutting down")
    if stop.is_set():  # signalled, not crashed
        await service.drain()
    await service.stop()
    if crashed.done():
        raise StartupError(str(crashed.result()))
