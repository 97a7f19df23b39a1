"""The web console (``--http-listen``): a page served by the control plane itself, and a JSON
gateway to its own ControlPlane API.

The gateway reaches the API as any client does, over gRPC, through a unix socket the gRPC
server also listens on, in a directory only this user can enter. So every call from the page
meets the same interceptors (tokens, workspace rights, request ids), servicers and limits as
a call from the SDK, and the console has no way around them. docs/console.md has the rest.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import grpc

from hotswap.control.console.app import console_app
from hotswap.service.edge import channel_options
from hotswap.service.http_edge import HttpServer, HttpTls

__all__ = ["Console", "console_app"]


class Console:
    """The console's HTTP server and its channel to the API. `bind` before the gRPC server
    starts, `start` after; `stop` undoes both."""

    def __init__(self, listen: str, *, tls: HttpTls | None = None, check_host: bool) -> None:
        self._listen = listen
        self._tls = tls
        self._check_host = check_host
        self._dir: Path | None = None
        self._channel: grpc.aio.Channel | None = None
        self._http: HttpServer | None = None

    @property
    def _socket(self) -> str:
        assert self._dir is not None, "bind() first"
        return f"unix:{self._dir / 'control.sock'}"

    @property
    def url(self) -> str:
        return f"{self._http.scheme}://{self._http.address}/" if self._http else ""

    def bind(self, server: grpc.aio.Server) -> None:
        """Adds the private socket to the API's gRPC server. Plaintext: it never leaves this
        machine, and only this user can reach it (the browser's side has the TLS)."""
        self._dir = Path(tempfile.mkdtemp(prefix="hotswap-console-"))  # mode 0700
        server.add_insecure_port(self._socket)

    async def start(self, address_file: Path | None = None) -> str:
        """Serves the console; writes ``<address_file>.http``; returns its URL."""
        self._channel = grpc.aio.insecure_channel(self._socket, options=channel_options())
        app = console_app(self._channel, check_host=self._check_host)
        self._http = HttpServer(app, self._listen, tls=self._tls)
        await self._http.start(address_file)
        return self.url

    async def stop(self, grace: float = 2.0) -> None:
        """Before the gRPC server stops: requests in flight still reach the API."""
        if self._http is not None:
            await self._http.stop(grace)
        if self._channel is not None:
            await self._channel.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
