"""The HTTP side of both services: an ASGI app (Starlette) on a uvicorn server inside the
service's own event loop, beside its gRPC server.

`HttpServer` binds the port itself, so a busy port fails the start the way gRPC's does
(StartupError, no second server on it) and engine processes can share one port on purpose
(SO_REUSEPORT). The service owns the signals: uvicorn's own handlers are never installed.
TLS uses the gRPC server's PEM files, so a service serving TLS never serves plaintext HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from starlette.requests import Request
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from hotswap.service.edge import StartupError

log = logging.getLogger(__name__)

# Bodies past this are refused (413) before they are read whole: what gRPC's message limit is.
MAX_BODY_BYTES = 64 * 1024 * 1024
# Connections served at once; past it uvicorn answers 503 at once.
MAX_CONNECTIONS = 1024
# Connections one client address may hold: one address cannot take every slot.
MAX_PER_CLIENT = 256
# A request's headers must arrive within this of its first byte (or of the connection
# opening), and its body within BODY_SECONDS: a client sending a byte at a time (slowloris)
# cannot hold connections without end. uvicorn times idle keep-alive connections out itself.
HEADER_SECONDS = 10.0
BODY_SECONDS = 60.0
# How often the server's own loop wakes when nothing happens (uvicorn's is 0.1 s).
TICK_SECONDS = 1.0


class BodyRefused(Exception):
    """A body too big (413) or too slow (408); `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def read_body(request: Request, limit: int, seconds: float = BODY_SECONDS) -> bytes:
    """The body, refused past `limit` bytes (from its declared length before it is read, or
    as it streams) or when it takes longer than `seconds` to arrive.

    Raises:
        BodyRefused: 413 or 408, with what to do.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyRefused(413, f"the body is {declared} bytes; at most {limit} per request")
    body = bytearray()
    try:
        async with asyncio.timeout(seconds):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise BodyRefused(413, f"the body is over {limit} bytes; at most that")
    except TimeoutError:
        raise BodyRefused(408, f"the body did not arrive within {seconds:g} s") from None
    return bytes(body)


class _BoundedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the two bounds it lacks: a header deadline, and a
    cap on the connections of one client address."""

    _header_timer: asyncio.TimerHandle | None = None
    # Set per server (`HttpServer`) on a subclass of its own.
    header_seconds = HEADER_SECONDS
    max_per_client = MAX_PER_CLIENT

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        client = self.client[0] if self.client else None
        if client is not None:
            peers: list[Any] = [getattr(c, "client", None) for c in self.connections]
            held = sum(1 for peer in peers if peer is not None and peer[0] == client)
            if held > self.max_per_client:
                transport.close()
                return
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_seconds, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


@dataclass(frozen=True, slots=True)
class HttpTls:
    cert: Path
    key: Path
    client_ca: Path | None = None  # mutual TLS: callers need a certificate of this CA

    @classmethod
    def of(cls, cert: Path | None, key: Path | None, client_ca: Path | None) -> HttpTls | None:
        """The HTTP side of a server's TLS flags (as `edge.server_credentials` is the gRPC
        side): None without a certificate and key, so that both doors speak the same."""
        return cls(cert, key, client_ca) if cert and key else None


class _QuietServer(uvicorn.Server):
    """uvicorn's server without its signal handlers, ticking once a second instead of ten
    times: its tick refreshes the Date header (once a second) and looks for `should_exit`,
    and those wake-ups were most of what an idle engine or control plane spent."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.exit_requested = asyncio.Event()  # `stop` sets it: no tick to wait for

    async def main_loop(self) -> None:
        counter = 0
        while not await self.on_tick(counter):
            counter += 10  # on_tick refreshes the Date header on multiples of ten
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.exit_requested.wait(), TICK_SECONDS)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The service handles SIGTERM/SIGINT (drain, then stop); uvicorn must not take them.
        yield


def host_is_address(host: str) -> bool:
    """Whether a Host header names this machine by address (or as localhost), not by a DNS
    name: a web page whose own name an attacker rebinds to this machine's address (DNS
    rebinding) still sends that name, so a server that needs no token can refuse it."""
    if host.startswith("["):  # [v6] or [v6]:port
        name, _, port = host[1:].partition("]")
        port = port.removeprefix(":") if port.startswith(":") else port or "0"
    else:
        name, _, port = host.partition(":")
        port = port or "0"
    if not port.isdigit() or "%" in name:  # a port is digits; no IPv6 zone ids
        return False
    if name.lower() == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def bind_socket(listen: str, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on host:port (port 0 picks one).

    Raises:
        StartupError: the port is taken, or the address is not one of this host's.
    """
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, ValueError):
        raise StartupError(f"cannot listen on {listen}: give host:port") from None
    family, kind, proto, _, address = infos[0]
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are
    # TCP, and without it an answer's header and body writes wait 40 ms on delayed ACKs.
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        else:
            # TIME_WAIT sockets of a previous run do not block a restart; a live server does.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise StartupError(
            f"cannot listen on {listen} for HTTP: {exc.strerror} (another process holds the "
            "port, or the address is not this host's); stop it or choose another port"
        ) from None
    sock.setblocking(False)
    return sock


class HttpServer:
    """`app` served on `listen` until `stop()`; `start()` returns host:port."""

    def __init__(
        self,
        app: Any,
        listen: str,
        *,
        tls: HttpTls | None = None,
        reuse_port: bool = False,
        max_connections: int = MAX_CONNECTIONS,
        max_per_client: int = MAX_PER_CLIENT,
        header_seconds: float = HEADER_SECONDS,
    ) -> None:
        self._app = app
        self._listen = listen
        self._tls = tls
        self._reuse_port = reuse_port
        self._max_connections = max_connections
        self._protocol = type(
            "BoundedProtocol",
            (_BoundedProtocol,),
            {"header_seconds": header_seconds, "max_per_client": max_per_client},
        )
        self._server: _QuietServer | None = None
        self._task: asyncio.Task[None] | None = None
        self.address = ""

    @property
    def scheme(self) -> str:
        return "https" if self._tls else "http"

    async def start(self, address_file: Path | None = None) -> str:
        sock = bind_socket(self._listen, self._reuse_port)
        tls = self._tls
        config = uvicorn.Config(
            self._app,
            http=self._protocol,
            # No X-Forwarded-* from anyone: the peer address is the socket's.
            proxy_headers=False,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            limit_concurrency=self._max_connections or None,
            timeout_keep_alive=30,
            ssl_certfile=tls.cert if tls else None,
            ssl_keyfile=tls.key if tls else None,
            ssl_ca_certs=tls.client_ca if tls else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.client_ca else ssl.CERT_NONE,
        )
        self._server = _QuietServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise StartupError(f"the HTTP server on {self._listen} did not start")
            await asyncio.sleep(0.01)
        host = self._listen.rpartition(":")[0] or "0.0.0.0"
        self.address = f"{host}:{sock.getsockname()[1]}"
        log.info("HTTP on %s://%s", self.scheme, self.address)
        if address_file is not None:
            tmp = Path(f"{address_file}.http.tmp")
            tmp.write_text(self.address)
            tmp.replace(Path(f"{address_file}.http"))
        return self.address

    async def stop(self, grace: float = 2.0) -> None:
        """Stops accepting, lets requests in flight finish for `grace` seconds, then ends."""
        server, task = self._server, self._task
        if server is None or task is None:
            return
        server.should_exit = True
        server.exit_requested.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), grace)
        except TimeoutError:
            server.force_exit = True
            await task
        self._server = self._task = None
