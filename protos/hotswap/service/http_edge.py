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

from hotswap.service.edge import StartupError

log = logging.getLogger(__name__)

# Bodies past this are refused (413) before they are read whole: what gRPC's message limit is.
MAX_BODY_BYTES = 64 * 1024 * 1024
# Connections served at once; past it uvicorn answers 503 at once.
MAX_CONNECTIONS = 1024


@dataclass(frozen=True, slots=True)
class HttpTls:
    cert: Path
    key: Path
    client_ca: Path | None = None  # mutual TLS: callers need a certificate of this CA


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The service handles SIGTERM/SIGINT (drain, then stop); uvicorn must not take them.
        yield


def host_is_address(host: str) -> bool:
    """Whether a Host header names this machine by address (or as localhost), not by a DNS
    name: a web page whose own name an attacker rebinds to this machine's address (DNS
    rebinding) still sends that name, so a server that needs no token can refuse it."""
    if host.startswith("["):  # [v6] or [v6]:port
        name, _, rest = host[1:].partition("]")
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return False
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
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
    ) -> None:
        self._app = app
        self._listen = listen
        self._tls = tls
        self._reuse_port = reuse_port
        self._max_connections = max_connections
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
            http="httptools",
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
        try:
            await asyncio.wait_for(asyncio.shield(task), grace)
        except TimeoutError:
            server.force_exit = True
            await task
        self._server = self._task = None
