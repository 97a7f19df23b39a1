"""The Prometheus text endpoint both services expose with ``--metrics-port``."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)


class MetricsEndpoint:
    """Serves `registry` at ``http://host:port/metrics`` from a daemon thread."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.address = ""

    def start(self, host: str, port: int, address_file: Path | None = None) -> str:
        """Binds (port 0 picks one); writes ``<address_file>.metrics`` with host:port."""
        self._server, self._thread = start_http_server(port, host, registry=self._registry)
        self.address = f"{host}:{self._server.server_port}"
        log.info("metrics on http://%s/metrics", self.address)
        if address_file is not None:
            target = Path(f"{address_file}.metrics")
            tmp = Path(f"{address_file}.metrics.tmp")
            tmp.write_text(self.address)
            tmp.replace(target)
        return self.address

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
