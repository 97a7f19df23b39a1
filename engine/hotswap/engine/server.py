"""Assembles an engine: blob cache, host, control link and the gRPC server."""

from __future__ import annotations

import asyncio
import gc
import logging
import shutil
import signal
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from hotswap.engine import access, workers
from hotswap.engine._auth_interceptor import EngineAuthInterceptor
from hotswap.engine.blob_cache import BlobCache
from hotswap.engine.dataplane import DataPlane, InferenceQueue
from hotswap.engine.health import EngineHealth
from hotswap.engine.host import EngineHost
from hotswap.engine.http import EngineHttp
from hotswap.engine.inference_log import InferenceLog, LogSettings
from hotswap.engine.link import BlobFetcher, ControlLink, new_instance_id
from hotswap.engine.metrics import EngineMetrics
from hotswap.engine.oip import InferenceServicer
from hotswap.engine.runtime import RuntimeOptions
from hotswap.engine.servicers import EngineIdentity, EngineServicer, code_name
from hotswap.engine.settings import Settings
from hotswap.engine.workers import WorkerRelay
from hotswap.oip import grpc_service_pb2, grpc_service_pb2_grpc
from hotswap.service.edge import (
    StartupError,
    add_servicer,
    bind,
    client_channel,
    is_loopback,
    server_credentials,
    server_options,
)
from hotswap.service.http_edge import HttpServer, HttpTls
from hotswap.service.metrics_http import MetricsEndpoint
from hotswap.service.probes import Health, add_probes
from hotswap.service.supervisor import Supervisor
from hotswap.v1 import engine_pb2, engine_pb2_grpc

log = logging.getLogger(__name__)

# Seconds between two looks at a drain's progress.
DRAIN_POLL = 0.02

# The services health checks and reflection name (besides Health and reflection themselves).
SERVICES = (
    engine_pb2.DESCRIPTOR.services_by_name["Engine"].full_name,
    grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
)


class EngineServer:
    """A running engine. `start()` binds, then connects to the control plane in the background."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._executor = ThreadPoolExecutor(
            max_workers=settings.workers, thread_name_prefix="infer"
        )
        # Fails closed: an engine with a control-plane credential belongs to a secured stack
        # and refuses every call until the control plane has sent who may call it.
        self.access_rules = access.Rules(fail_closed=settings.secured)
        # Without a credential the engine can only join an open control plane (a secured one
        # refuses it), so it has nothing to check and skips the interceptor's cost.
        guard = [EngineAuthInterceptor(self.access_rules)] if settings.secured else []
        self._server = grpc.aio.server(
            options=server_options(reuse_port=settings.reuse_port or settings.processes > 1),
            interceptors=guard,
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None,
        )
        self._queue = InferenceQueue(self._executor, settings.max_queued)
        self._identity = EngineIdentity()
        self.link: ControlLink | None = None
        self.host: EngineHost | None = None
        self.supervisor = Supervisor()
        self.address = ""
        self.name = ""
        self.metrics = EngineMetrics()
        self.metrics_endpoint = MetricsEndpoint(self.metrics.registry)
        self.inference_log: InferenceLog | None = None
        self._health: Health | None = None
        self._health_server: grpc.aio.Server | None = None  # --health-listen
        self._http: HttpServer | None = None  # --http-listen
        self._plane: DataPlane | None = None
        # With --processes N: the relay to the N-1 worker processes, and the processes.
        self.relay: WorkerRelay | None = None
        self._relay_server: grpc.aio.Server | None = None
        self._workers: list[subprocess.Popen[bytes]] = []
        self._relay_dir = Path()

    def _check_credential_transport(self) -> None:
        settings = self.settings
        if not settings.control_token or settings.control_ca or is_loopback(settings.control):
            return
        if not settings.allow_plaintext_token:
            raise StartupError(
                f"refusing to send the engine credential to {settings.control} over plaintext: "
                "pass --control-ca (TLS), or --allow-plaintext-token to accept the risk"
            )
        log.warning("sending the engine credential to %s over plaintext", settings.control)

    async def start(self) -> str:
        self._check_credential_transport()
        if not self.settings.reuse_port:  # process 0: a worker's drain is process 0's
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGUSR1, self.begin_drain, "about to stop (SIGUSR1)"
            )
        port = bind(
            self._server,
            self.settings.listen,
            server_credentials(
                self.settings.tls_cert, self.settings.tls_key, self.settings.tls_client_ca
            ),
        )
        host_part = self.settings.listen.rsplit(":", 1)[0]
        self.address = self.settings.advertise or f"{host_part}:{port}"
        self.name = self.settings.engine_name(port)
        cache_dir = self.settings.cache_dir or Path.home() / ".hotswap" / "engines" / self.name
        host, link = self._assemble(cache_dir)
        self._health = await add_probes(self._server, SERVICES)
        # A secured engine does not answer per-pipeline names: anyone may ask health, and the
        # answers would tell them which workspaces and pipelines exist here.
        health = EngineHealth(host, self._health, SERVICES, per_pipeline=not self.settings.secured)
        self.supervisor.spawn("health", health.run_forever())
        if self.settings.health_listen:
            self._health_server, _ = await self._health.serve_alone(self.settings.health_listen)
        await self._server.start()
        http_port = await self._start_http(link) if self.settings.http_listen else 0
        if self.relay is not None:
            try:
                await self._start_workers(self.relay, port, cache_dir, http_port)
            except BaseException:
                await self._stop_workers(grace=0)  # none may serve the port on its own
                raise
        self.supervisor.spawn("control-link", link.run_forever())
        self.supervisor.spawn("reaper", host.reap_forever())
        if self.inference_log is not None:
            self.supervisor.spawn("inference-log", self.inference_log.run_forever())
        if self.settings.metrics_port >= 0:
            self.metrics_endpoint.start(
                self.settings.metrics_host, self.settings.metrics_port, self.settings.address_file
            )
        log.info(
            "engine %s serving on %s, control plane %s, cache %s",
            self.name,
            self.address,
            self.settings.control,
            cache_dir,
        )
        # Everything made so far (modules, the server, its parts) lives as long as the process:
        # out of the collector's sight, a full collection no longer walks it. One took ~25 ms
        # with the event loop stopped, a swap window's worst stall (ADR 5).
        gc.freeze()
        if self.settings.address_file is not None:
            tmp = self.settings.address_file.with_suffix(".tmp")
            tmp.write_text(self.address)
            tmp.replace(self.settings.address_file)
        return self.address

    async def _start_http(self, link: ControlLink) -> int:
        """Serves HTTP on the data plane gRPC uses; returns the bound port."""
        settings = self.settings
        assert self.host is not None and self._plane is not None
        routes = EngineHttp(
            self.host,
            self._plane,
            self.access_rules,
            self.name,
            loopback_only=is_loopback(settings.http_listen),
        )
        self._http = HttpServer(
            routes.app(),
            settings.http_listen,
            tls=HttpTls.of(settings.tls_cert, settings.tls_key, settings.tls_client_ca),
            reuse_port=settings.reuse_port or settings.processes > 1,
            max_connections=settings.max_concurrent_rpcs,
        )
        bound = await self._http.start(settings.address_file)
        port = int(bound.rpartition(":")[2])
        # Told to the control plane (pipeline.url()) beside the gRPC address it advertises.
        link.http_address = f"{self.address.rpartition(':')[0]}:{port}"
        return port

    async def _stop_workers(self, grace: float) -> None:
        if self.relay is None:
            return
        # The watchers go first (a worker stopping now is no crash); their threads end as the
        # workers exit below.
        for index in range(1, len(self._workers) + 1):
            await self.supervisor.cancel(f"worker-{index}")
        await asyncio.to_thread(workers.stop, self._workers, grace)
        if self._relay_server is not None:
            await self._relay_server.stop(None)
            shutil.rmtree(self._relay_dir, ignore_errors=True)

    async def _start_workers(
        self, relay: WorkerRelay, port: int, cache_dir: Path, http_port: int
    ) -> None:
        """Starts the worker processes on the bound port and waits until all are linked:
        the control plane hears of this engine only once every process takes its swaps."""
        count = self.settings.processes - 1
        self.metrics.worker_endpoints = lambda: workers.metrics_endpoints(cache_dir, count)
        self._relay_dir = Path(tempfile.mkdtemp(prefix="hotswap-"))  # mode 0700: this user's
        address = f"unix:{self._relay_dir / 'workers.sock'}"
        self._relay_server = workers.unix_server(relay, address)
        await self._relay_server.start()
        for index in range(1, self.settings.processes):
            worker = workers.worker_settings(
                self.settings, address, port, index, cache_dir, self.name, http_port
            )
            process = workers.spawn(worker)
            self._workers.append(process)
            self.supervisor.spawn(f"worker-{index}", workers.watch(process, worker.name))
        try:
            await relay.wait_connected(timeout=60)
        except TimeoutError:
            raise StartupError(
                f"{relay.expected} worker process(es) did not start within 60 s; see the log"
            ) from None
        log.info(
            "engine %s serves %s from %d processes", self.name, self.address, len(self._workers) + 1
        )

    def _assemble(self, cache_dir: Path) -> tuple[EngineHost, ControlLink]:
        """Builds the parts in dependency order (fetcher, cache, host, log, data plane,
        servicers, link) and adds the servicers to the server."""
        channel = client_channel(
            self.settings.control,
            ca=self.settings.control_ca,
            cert=self.settings.control_cert,
            key=self.settings.control_key,
        )
        instance_id = new_instance_id()
        fetcher = BlobFetcher(channel, self.settings.control_token, self.name, instance_id)
        cache = BlobCache(cache_dir / "blobs", fetcher.fetch)
        self.host = EngineHost(
            cache,
            RuntimeOptions(
                intra_op_threads=self.settings.threads,
                isolate_bytes=self.settings.isolate_bytes,
            ),
            self.settings.retain_seconds,
            self.settings.retain_versions,
        )
        self.metrics.watch(self.host.loaded_versions, lambda: _dir_bytes(cache_dir / "blobs"))
        if self.settings.processes > 1:
            self.relay = WorkerRelay(cache, self.settings.processes - 1)
        if self.settings.inference_log:
            self.inference_log = InferenceLog(
                LogSettings(
                    self.settings.log_dir or cache_dir / "inference-logs",
                    memory_bytes=self.settings.log_memory_bytes,
                    disk_bytes=self.settings.log_disk_bytes,
                ),
                self.name,
            )
            stats = self.inference_log.stats
            self.metrics.watch_log(
                lambda: stats.appended_rows,
                lambda: stats.dropped_rows,
                lambda: stats.pending_bytes,
                lambda: stats.disk_bytes,
            )
        plane = DataPlane(
            self._queue,
            self.metrics,
            self.inference_log,
            max_rows=self.settings.max_rows,
            inline_bytes=self.settings.inline_bytes,
            code_of=code_name,
        )
        self._plane = plane
        engine = EngineServicer(self.host, plane, self._identity, inference_log=self.inference_log)
        self.link = ControlLink(
            self.host,
            self.settings.control,
            self.name,
            self.address,
            self.settings.heartbeat_interval,
            self.metrics,
            channel=channel,
            token=self.settings.control_token,
            rules=self.access_rules,
            logs=engine.logs,
            instance_id=instance_id,
            relay=self.relay,
            labels=dict(self.settings.labels),
        )
        self._identity.name = self.name
        self._identity.address = self.address
        self._identity.connected = self.link.connected.is_set
        add_servicer(self._server, engine_pb2_grpc.add_EngineServicer_to_server, engine)
        add_servicer(
            self._server,
            grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
            InferenceServicer(self.host, plane),
        )
        return self.host, self.link

    def begin_drain(self, reason: str) -> None:
        """Starts draining (NOT_SERVING, and the control plane moves the pipelines away) while
        the engine goes on serving until it is stopped. On SIGUSR1, which a Kubernetes preStop
        hook sends before SIGTERM, so that no replica is placed here in the meantime."""
        if self.host is None or self.link is None or self.settings.reuse_port:
            return
        self.host.draining = True
        self.host.changes.notify()
        self.link.drain(reason)

    async def drain(self) -> None:
        """On SIGTERM, before stopping: says so to the control plane (even when serving
        nothing, so that no replica is placed here meanwhile), which moves this engine's
        pipelines to other engines (two-phase, this one serving until each commit) and answers
        with what no other engine could take. Returns once this engine serves only that, or
        after `drain_timeout`. A stream lost meanwhile (a control plane restarting) does not
        end the wait while pipelines are still here: the drain goes on when the link is back.
        Health answers NOT_SERVING throughout; in-flight requests finish in `stop`. Worker
        processes have nothing to say: process 0 drains for them."""
        host, link = self.host, self.link
        if host is None or link is None or self.settings.reuse_port:
            return
        self.begin_drain("shutting down (SIGTERM)")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_timeout

        def moving() -> bool:
            if loop.time() >= deadline:
                return False
            served = {s.key for s in host.states()}
            if link.drained.is_set():
                return not served <= link.kept
            return bool(served) or link.connected.is_set()

        # Polled: the answer, the releases and the stream's ups and downs are separate events.
        while moving():
            await asyncio.sleep(DRAIN_POLL)
        left = sorted(state.key for state in host.states())
        if not link.drained.is_set():
            if left or link.connected.is_set():
                log.warning(
                    "stopping without the control plane's drain answer (%s); still serving %s",
                    "timed out" if link.connected.is_set() else "it is away",
                    ", ".join(left) or "nothing",
                )
        elif left:
            log.warning("drained; no other engine could take %s", ", ".join(left))
        else:
            log.info("drained: every pipeline moved to other engines")

    async def stop(self, grace: float = 2.0) -> None:
        if self._health is not None:
            await self._health.shutdown()  # probes see NOT_SERVING while requests drain
        await self.supervisor.cancel("control-link")
        if self.link is not None:
            await self.link.close()
        # Both doors finish their requests in flight in the same grace period.
        await asyncio.gather(
            self._server.stop(grace), self._http.stop(grace) if self._http else asyncio.sleep(0)
        )
        if self._health_server is not None:
            await self._health_server.stop(0)
        await self._stop_workers(grace)
        await self.supervisor.cancel("inference-log")  # flushes what is left
        await self.supervisor.cancel()
        if self.host is not None:
            self.host.close()
        self.metrics_endpoint.stop()
        self._executor.shutdown(wait=True, cancel_futures=True)


def _dir_bytes(directory: Path) -> float:
    if not directory.is_dir():
        return 0.0
    return float(sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()))
