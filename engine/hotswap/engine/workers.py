"""One engine on every core: worker processes that share the engine's port and its swaps.

With `--processes N` the engine (process 0) starts N-1 worker processes. Each is an ordinary
engine process bound to the same address with SO_REUSEPORT, so the kernel spreads incoming
connections over all N, and each runs its own event loop, data plane and ONNX Runtime
sessions: no GIL is shared. The control plane still sees one engine: only process 0 holds the
Fleet stream. The workers' links connect to `WorkerRelay`, a Fleet service of process 0 on a
local socket, which hands them every message process 0 gets and waits for all of them before
process 0 answers:

- a prepare is answered prepared only when every process has prepared (or with the first
  failure), a commit committed only when every process has switched, so a client that saw
  `Deploy` return reads the new version whichever process its connection reached;
- the desired state counts as applied when every process applied it;
- access rules reach every process (each checks tokens itself), log queries gather every
  process's inference log, and blobs are fetched once, into the cache they share.

A worker that exits stops the whole engine (its supervisor restarts it as one unit): a
partial engine would answer for versions some of its processes do not serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa

from hotswap.engine.blob_cache import BlobCache
from hotswap.engine.inference_log import encode
from hotswap.engine.settings import Settings
from hotswap.service.edge import add_servicer, server_options
from hotswap.service.log_tables import concat_logs
from hotswap.v1 import fleet_pb2, fleet_pb2_grpc, types_pb2

log = logging.getLogger(__name__)

# How long process 0 waits for its workers' answers: a stuck worker fails the swap (and the
# control plane's own deadlines apply on top). Prepares build sessions, which can take long.
PREPARE_TIMEOUT = 600.0
ANSWER_TIMEOUT = 60.0

# The settings of a worker process, as JSON in its environment (see `spawn`), and the pid of
# the process 0 it belongs to.
SETTINGS_ENV = "HOTSWAP_WORKER_SETTINGS"
PARENT_ENV = "HOTSWAP_WORKER_PARENT"
_PR_SET_PDEATHSIG = 1
CHUNK = 1 << 20


class WorkerGone(RuntimeError):
    """A worker's stream ended while process 0 waited for its answer."""


@dataclasses.dataclass
class _Worker:
    name: str
    outbox: asyncio.Queue[fleet_pb2.ControlMessage]
    revision: int = 0  # the desired state revision it reported applied
    # What its split and shadow models served, as its last heartbeat said (ModelTraffic).
    traffic: list[types_pb2.ModelTraffic] = dataclasses.field(default_factory=list)
    # Its loaded versions' request counts, as its last heartbeat said (VersionTraffic).
    versions: list[fleet_pb2.VersionTraffic] = dataclasses.field(default_factory=list)
    waiting: dict[str, asyncio.Future[Any]] = dataclasses.field(default_factory=dict)


class WorkerRelay(fleet_pb2_grpc.FleetServicer):
    """Process 0's Fleet service for its workers, and the fan-out of its link's messages."""

    def __init__(self, cache: BlobCache, expected: int) -> None:
        self._cache = cache
        self.expected = expected
        self._workers: dict[str, _Worker] = {}
        self._changed = asyncio.Condition()
        # What a (re)connecting worker must be told first: the latest rules, and what process 0
        # serves now (set by its link; not the last DesiredState, which swaps have moved on).
        self._access: fleet_pb2.AccessRules | None = None
        self.serving: Callable[[], fleet_pb2.DesiredState] = fleet_pb2.DesiredState
        self._preparing: set[str] = set()  # swaps the workers were asked to prepare

    # -- the workers' side ----------------------------------------------------------------

    async def Connect(
        self, request_iterator: AsyncIterator[fleet_pb2.EngineMessage], context: Any
    ) -> AsyncIterator[fleet_pb2.ControlMessage]:
        hello = await anext(aiter(request_iterator))
        worker = _Worker(hello.hello.name, asyncio.Queue())
        if self._access is not None:
            worker.outbox.put_nowait(fleet_pb2.ControlMessage(access=self._access))
        worker.outbox.put_nowait(fleet_pb2.ControlMessage(desired=self.serving()))
        self._workers[worker.name] = worker
        async with self._changed:
            self._changed.notify_all()
        reader = asyncio.create_task(self._read(worker, request_iterator))
        try:
            while True:
                yield await worker.outbox.get()
        finally:
            reader.cancel()
            if self._workers.get(worker.name) is worker:  # not a newer stream of that name
                del self._workers[worker.name]
            for waiting in worker.waiting.values():
                if not waiting.done():
                    waiting.set_exception(WorkerGone(f"worker {worker.name} went away"))

    async def _read(
        self, worker: _Worker, messages: AsyncIterator[fleet_pb2.EngineMessage]
    ) -> None:
        async for message in messages:
            kind = message.WhichOneof("kind")
            if kind == "heartbeat":
                worker.traffic = list(message.heartbeat.traffic)
                worker.versions = list(message.heartbeat.versions)
            elif kind == "state":
                worker.revision = max(worker.revision, message.state.revision)
                async with self._changed:
                    self._changed.notify_all()
            elif kind in ("prepared", "committed"):
                answer = getattr(message, kind)
                self._resolve(worker, f"{kind}:{answer.swap_id}", answer)
            elif kind == "logs":
                self._resolve(worker, f"logs:{message.logs.query_id}", message.logs)

    @staticmethod
    def _resolve(worker: _Worker, key: str, answer: Any) -> None:
        waiting = worker.waiting.pop(key, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(answer)

    async def FetchBlob(
        self, request: fleet_pb2.FetchBlobRequest, context: Any
    ) -> AsyncIterator[fleet_pb2.BlobChunk]:
        # Through process 0's cache: a blob is fetched from the control plane once per host.
        path = await self._cache.ensure(request.sha256)
        with path.open("rb") as f:
            f.seek(request.offset)
            while chunk := await asyncio.to_thread(f.read, CHUNK):
                yield fleet_pb2.BlobChunk(data=chunk)

    # -- process 0's side -----------------------------------------------------------------

    def traffic(self) -> list[types_pb2.ModelTraffic]:
        """The workers' model counts, for process 0's heartbeat: the control plane sums every
        entry of a version, so a rollout judges all of the engine's processes."""
        return [t for worker in list(self._workers.values()) for t in worker.traffic]

    def versions(self) -> list[fleet_pb2.VersionTraffic]:
        """The workers' version counts, for process 0's heartbeat (summed by the control
        plane, so the engine's requests/s counts every process)."""
        return [v for worker in list(self._workers.values()) for v in worker.versions]

    async def wait_connected(self, timeout: float) -> None:
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: len(self._workers) >= self.expected), timeout
            )

    async def _ask(self, message: fleet_pb2.ControlMessage, key: str, timeout: float) -> list[Any]:
        """Every worker's answer to `message` (matched by `key`), or WorkerGone if one is not
        connected, goes away or does not answer within `timeout`."""
        workers = list(self._workers.values())
        if len(workers) < self.expected:
            raise WorkerGone("a worker process is not connected")
        loop = asyncio.get_running_loop()
        asked: list[tuple[_Worker, asyncio.Future[Any]]] = []
        for worker in workers:
            if key in worker.waiting:
                raise WorkerGone(f"{key} is already being asked of worker {worker.name}")
            waiting: asyncio.Future[Any] = loop.create_future()
            worker.waiting[key] = waiting
            worker.outbox.put_nowait(message)
            asked.append((worker, waiting))
        try:
            return list(await asyncio.wait_for(asyncio.gather(*(f for _, f in asked)), timeout))
        except TimeoutError:
            raise WorkerGone(f"a worker process did not answer {key} in {timeout:g} s") from None
        finally:
            for worker, waiting in asked:
                if worker.waiting.get(key) is waiting:
                    del worker.waiting[key]

    async def prepare(self, prepare: fleet_pb2.Prepare) -> list[fleet_pb2.PrepareResult]:
        """Every worker's answer to `prepare` (WorkerGone if one cannot answer)."""
        self._preparing.add(prepare.swap_id)
        message = fleet_pb2.ControlMessage(prepare=prepare)
        return await self._ask(message, f"prepared:{prepare.swap_id}", PREPARE_TIMEOUT)

    async def commit(self, commit: fleet_pb2.Commit) -> list[fleet_pb2.CommitResult]:
        self._preparing.discard(commit.swap_id)
        message = fleet_pb2.ControlMessage(commit=commit)
        return await self._ask(message, f"committed:{commit.swap_id}", ANSWER_TIMEOUT)

    def abort(self, abort: fleet_pb2.Abort) -> None:
        self._preparing.discard(abort.swap_id)
        self._tell(fleet_pb2.ControlMessage(abort=abort))

    def abort_all(self) -> None:
        """Aborts every swap the workers were asked to prepare (process 0's stream is new:
        those swaps will never be committed)."""
        for swap_id in list(self._preparing):
            self.abort(fleet_pb2.Abort(swap_id=swap_id, reason="the control plane stream ended"))

    def access(self, rules: fleet_pb2.AccessRules) -> None:
        self._access = rules
        self._tell(fleet_pb2.ControlMessage(access=rules))

    async def apply_desired(self, desired: fleet_pb2.DesiredState) -> None:
        """Hands every worker the desired state; returns once all have applied it (raises
        WorkerGone if they have not within the prepare timeout)."""
        self._tell(fleet_pb2.ControlMessage(desired=desired))

        def applied() -> bool:
            workers = self._workers.values()
            return len(workers) >= self.expected and all(
                w.revision >= desired.revision for w in workers
            )

        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(applied), PREPARE_TIMEOUT)
        except TimeoutError:
            raise WorkerGone("the worker processes did not apply the desired state") from None

    def resync(self, serving: fleet_pb2.DesiredState) -> None:
        """Tells every worker what process 0 serves (after a worker failed a commit)."""
        self._tell(fleet_pb2.ControlMessage(desired=serving))

    async def logs(self, query: fleet_pb2.LogsQuery) -> list[fleet_pb2.LogsResult]:
        message = fleet_pb2.ControlMessage(logs=query)
        return await self._ask(message, f"logs:{query.query_id}", ANSWER_TIMEOUT)

    def _tell(self, message: fleet_pb2.ControlMessage) -> None:
        for worker in list(self._workers.values()):
            worker.outbox.put_nowait(message)


def merge_logs(
    own: types_pb2.LogsResponse, others: list[fleet_pb2.LogsResult], limit: int
) -> types_pb2.LogsResponse:
    """One answer from every process's log rows: newest first, at most `limit`."""
    tables = [pa.ipc.open_stream(own.arrow).read_all()] if own.arrow else []
    dropped = own.dropped_rows
    for result in others:
        if result.error:
            raise RuntimeError(result.error)
        if result.logs.arrow:
            tables.append(pa.ipc.open_stream(result.logs.arrow).read_all())
        dropped += result.logs.dropped_rows
    if not tables:
        return types_pb2.LogsResponse(dropped_rows=dropped)
    table = concat_logs(tables).sort_by([("time", "descending")]).slice(0, limit)
    return types_pb2.LogsResponse(arrow=encode(table), dropped_rows=dropped)


def worker_settings(
    settings: Settings,
    relay: str,
    port: int,
    index: int,
    cache: Path,
    name: str,
    http_port: int = 0,
) -> Settings:
    """Worker `index`'s settings: process 0's (named `name`), on the same ports, linked to
    the relay."""
    host = settings.listen.rsplit(":", 1)[0]
    http_host = settings.http_listen.rpartition(":")[0]
    return dataclasses.replace(
        settings,
        control=relay,
        listen=f"{host}:{port}",
        http_listen=f"{http_host}:{http_port}" if settings.http_listen else "",
        name=f"{name}.w{index}",
        cache_dir=cache,
        log_dir=cache / "worker-logs" / f"w{index}",
        processes=1,
        reuse_port=True,
        # Checked like process 0's calls: the rules come over the relay.
        require_access=settings.require_access or bool(settings.control_token),
        control_token="",
        control_ca=None,
        control_cert=None,
        control_key=None,
        # Scraped by process 0 over loopback, whose /metrics then counts every process.
        metrics_port=0 if settings.metrics_port >= 0 else -1,
        metrics_host="127.0.0.1",
        address_file=worker_address_file(cache, index),
        health_listen="",  # process 0 answers the probes
    )


def worker_address_file(cache: Path, index: int) -> Path:
    """Where worker `index` writes its addresses (`.metrics`: its metrics endpoint)."""
    return cache / "worker-logs" / f"w{index}.address"


def metrics_endpoints(cache: Path, count: int) -> list[str]:
    """The metrics endpoints the workers have written so far."""
    found = []
    for index in range(1, count + 1):
        with contextlib.suppress(OSError):
            found.append(Path(f"{worker_address_file(cache, index)}.metrics").read_text().strip())
    return found


def spawn(settings: Settings) -> subprocess.Popen[bytes]:
    """Starts a worker process with `settings` (given as JSON, never as flags to re-parse)."""
    encoded = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(settings).items()
    }
    if settings.address_file is not None:  # a stale one would name another process
        settings.address_file.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{settings.address_file}.metrics").unlink(missing_ok=True)
    env = {**os.environ, SETTINGS_ENV: json.dumps(encoded), PARENT_ENV: str(os.getpid())}
    env.pop("HOTSWAP_ENGINE_TOKEN", None)  # the credential stays with process 0
    return subprocess.Popen([sys.executable, "-m", "hotswap.engine"], env=env)


def die_with_parent(parent: int) -> None:
    """Makes this worker get SIGTERM when process 0 dies, however it dies: an orphan would
    keep serving the port with versions nobody coordinates any more."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # process 0 died before the line above took effect
        os.kill(os.getpid(), signal.SIGTERM)


def settings_from_env(value: str) -> Settings:
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    raw = json.loads(value)
    paths = {name for name, f in fields.items() if "Path" in str(f.type)}
    values: dict[str, Any] = {
        k: (Path(v) if k in paths and v is not None else v) for k, v in raw.items() if k in fields
    }
    values["labels"] = tuple(tuple(pair) for pair in values.get("labels", ()))
    return Settings(**values)


async def watch(process: subprocess.Popen[bytes], name: str) -> None:
    """Returns never while the worker runs; raises when it exits (the engine then stops)."""
    code = await asyncio.to_thread(process.wait)
    raise RuntimeError(f"worker process {name} exited with code {code}: stopping the engine")


def stop(processes: list[subprocess.Popen[bytes]], grace: float) -> None:
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
    for process in processes:
        try:
            process.wait(grace + 5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def unix_server(relay: WorkerRelay, address: str) -> grpc.aio.Server:
    # The engine's message limits: a worker's LogsResult can be tens of MB.
    server = grpc.aio.server(options=server_options())
    add_servicer(server, fleet_pb2_grpc.add_FleetServicer_to_server, relay)
    server.add_insecure_port(address)
    return server
