"""Assembles the control plane: store, blobs, fleet, deployer and the gRPC server."""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import TextIO

import grpc

from hotswap.control._auth_interceptor import AuthInterceptor
from hotswap.control.auth import Grant, TokenFile
from hotswap.control.blobs import BlobStore
from hotswap.control.console import Console
from hotswap.control.coordinator import SwapCoordinator
from hotswap.control.engine_logs import LogGatherer
from hotswap.control.fleet import Fleet
from hotswap.control.metrics import ControlMetrics
from hotswap.control.rollout import Rollouts
from hotswap.control.servicers import ControlPlaneServicer, FleetServicer
from hotswap.control.settings import Settings
from hotswap.control.store import Store
from hotswap.control.timeline import SwapTimeline
from hotswap.control.uploads import ModelUploads
from hotswap.service.edge import (
    add_servicer,
    bind,
    is_loopback,
    server_credentials,
    server_options,
)
from hotswap.service.http_edge import HttpTls
from hotswap.service.log_config import RequestIdInterceptor
from hotswap.service.metrics_http import MetricsEndpoint
from hotswap.service.probes import Health, add_probes
from hotswap.service.supervisor import Supervisor
from hotswap.v1 import control_pb2, control_pb2_grpc, fleet_pb2, fleet_pb2_grpc

log = logging.getLogger(__name__)

# The services health checks and reflection name (besides Health and reflection themselves).
SERVICES = (
    control_pb2.DESCRIPTOR.services_by_name["ControlPlane"].full_name,
    fleet_pb2.DESCRIPTOR.services_by_name["Fleet"].full_name,
)


class ControlPlaneServer:
    """A running control plane. `start()` binds (port 0 picks one); `address` says where."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self._dir_lock = lock_data_dir(settings.data_dir)
        self.tokens = TokenFile(settings.tokens_file) if settings.tokens_file else None
        self.store = Store(settings.data_dir / "hotswap.db")
        self.blobs = BlobStore(settings.data_dir / "blobs")
        self.metrics = ControlMetrics()
        self.timeline = SwapTimeline(settings.data_dir / "hotswap.db")
        self.fleet = Fleet(
            settings.lost_after,
            self.metrics,
            access=self._access,
            forget_after=settings.forget_after,
        )
        self.coordinator = SwapCoordinator(
            self.store,
            self.fleet,
            prepare_timeout=settings.prepare_timeout,
            commit_timeout=settings.commit_timeout,
            timeline=self.timeline,
            metrics=self.metrics,
        )
        self.logs = LogGatherer(self.fleet)
        self.rollouts = Rollouts(
            self.store, self.coordinator, self.fleet.traffic, self.fleet.instance_of
        )
        self.fleet.on_traffic = self.rollouts.wake
        self.metrics_endpoint = MetricsEndpoint(self.metrics.registry)
        uploads = ModelUploads(self.store, self.blobs, settings.max_model_bytes)
        interceptors: list[grpc.aio.ServerInterceptor] = [RequestIdInterceptor()]
        if self.tokens is not None:
            interceptors.append(AuthInterceptor(self.tokens))
        self._server = self._grpc_server(interceptors)
        # With --fleet-listen, engines have a server (and port) of their own.
        self._fleet_server = self._grpc_server(interceptors) if settings.fleet_listen else None
        add_servicer(
            self._server,
            control_pb2_grpc.add_ControlPlaneServicer_to_server,
            ControlPlaneServicer(
                self.store,
                uploads,
                self.coordinator,
                self.fleet,
                timeline=self.timeline,
                logs=self.logs,
                rollouts=self.rollouts,
            ),
        )
        add_servicer(
            self._fleet_server or self._server,
            fleet_pb2_grpc.add_FleetServicer_to_server,
            FleetServicer(self.fleet, self.coordinator, self.blobs, self.store),
        )
        # The web console: its own HTTP port, calling this server's API like any client.
        self.console = (
            Console(
                settings.http_listen,
                tls=HttpTls.of(settings.tls_cert, settings.tls_key, settings.tls_client_ca),
                # Open, the console's own checks are all that stand before the API.
                check_host=self.tokens is None,
            )
            if settings.http_listen
            else None
        )
        self.address = ""
        self.fleet_address = ""  # where engines connect: `address` unless --fleet-listen
        self._health_server: grpc.aio.Server | None = None
        self.supervisor = Supervisor()
        self._health: Health | None = None

    def _grpc_server(self, interceptors: list[grpc.aio.ServerInterceptor]) -> grpc.aio.Server:
        return grpc.aio.server(
            options=server_options(),
            interceptors=interceptors,
            maximum_concurrent_rpcs=self.settings.max_concurrent_rpcs or None,
        )

    async def start(self) -> str:
        settings = self.settings
        credentials = server_credentials(
            settings.tls_cert, settings.tls_key, settings.tls_client_ca
        )
        port = bind(self._server, settings.listen, credentials)
        self.address = f"{settings.listen.rsplit(':', 1)[0]}:{port}"
        self.fleet_address = self.address
        services = SERVICES if self._fleet_server is None else SERVICES[:1]
        self._health = await add_probes(self._server, services)
        if self._fleet_server is not None:
            fleet_port = bind(self._fleet_server, settings.fleet_listen, credentials)
            self.fleet_address = f"{settings.fleet_listen.rsplit(':', 1)[0]}:{fleet_port}"
            await self._fleet_server.start()
        if settings.health_listen:
            self._health_server, _ = await self._health.serve_alone(settings.health_listen)
        if self.console is not None:
            self.console.bind(self._server)
        await self._server.start()
        # The store was opened (and migrated) in __init__: the API can answer from now on.
        for name in ("", *services):
            await self._health.set(name, True)
        self.rollouts.resume()
        self.supervisor.spawn(
            "heartbeat",
            self.fleet.heartbeat_forever(self.settings.heartbeat_interval, self._housekeeping),
        )
        log.info(
            "control plane serving on %s%s with %s (data in %s)",
            self.address,
            f", engines on {self.fleet_address}" if self._fleet_server is not None else "",
            "mutual TLS" if self.settings.tls_client_ca else "TLS" if credentials else "plaintext",
            self.settings.data_dir,
        )
        if self.settings.tokens_file is None:
            log.warning(
                "no --tokens-file: the API and the fleet stream are open to anyone who can "
                "reach %s (fine on loopback for local work, not in production)",
                self.address,
            )
        if self.settings.metrics_port >= 0:
            self.metrics_endpoint.start(
                self.settings.metrics_host, self.settings.metrics_port, self.settings.address_file
            )
        if self.console is not None:
            log.info("web console on %s", await self.console.start(self.settings.address_file))
            plaintext = not credentials and not is_loopback(settings.http_listen)
            if self.tokens is not None and plaintext:
                log.warning(
                    "the web console on %s has no TLS: browsers will send tokens in cleartext "
                    "(give --tls-cert/--tls-key, or put a TLS proxy in front)",
                    settings.http_listen,
                )
        if self.settings.address_file is not None:
            _write_atomically(Path(f"{self.settings.address_file}.fleet"), self.fleet_address)
            _write_atomically(self.settings.address_file, self.address)  # last: "started"
        return self.address

    def _access(self) -> tuple[bool, list[Grant]]:
        """What engines need to check user tokens themselves: digests, never tokens."""
        if self.tokens is None:
            return False, []
        return True, self.tokens.book.grants()

    def _housekeeping(self) -> None:
        """Once per heartbeat: token file changes reach engines, lost replicas move to spare
        engines, and state of engines gone for good is dropped."""
        if self.tokens is not None and self.tokens.reload_if_changed():
            self.fleet.push_access()
        self.coordinator.refill_lost()
        assigned = {e for d in self.store.deployments() for e in d.engines}
        self.fleet.forget_gone(keep=assigned.__contains__)

    async def wait(self) -> None:
        await self._server.wait_for_termination()

    async def drain(self) -> None:
        """Nothing to hand over: engines keep serving while the control plane is away."""

    async def stop(self, grace: float = 2.0) -> None:
        if self._health is not None:
            await self._health.shutdown()  # probes see NOT_SERVING while requests drain
        await self.supervisor.cancel()
        if self.console is not None:
            await self.console.stop(grace)
        await self.rollouts.close()
        await self.coordinator.close()
        await self._server.stop(grace)
        for other in (self._fleet_server, self._health_server):
            if other is not None:
                await other.stop(grace)
        self.metrics_endpoint.stop()
        self.timeline.close()
        self.store.close()
        self._dir_lock.close()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def lock_data_dir(data_dir: Path) -> TextIO:
    """Holds an exclusive lock on `data_dir` for this process's life: a second control plane
    on the same directory would split one store between two writers."""
    lock = (data_dir / "control.lock").open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        other = lock.read().strip() or "another process"
        lock.close()
        raise DataDirInUse(
            f"data dir {data_dir} is in use by another control plane ({other}): stop it, "
            "or give this one its own --data-dir"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()}")
    lock.flush()
    return lock


class DataDirInUse(OSError):
    """Another control plane holds the data dir."""
