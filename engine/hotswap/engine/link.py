"""The engine's side of ``Fleet.Connect``: dial the control plane, keep the stream up, and turn
its messages into calls on the `EngineHost`. Serving never depends on this stream: while the
control plane is away the engine keeps serving what it has, and resyncs when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import Any

import grpc
import pyarrow as pa

from hotswap.engine import _convert, access
from hotswap.engine.errors import (
    BlobError,
    EngineError,
    NotPrepared,
    PrepareError,
    WarmupFailed,
)
from hotswap.engine.host import EngineHost, Prepared
from hotswap.engine.metrics import EngineMetrics
from hotswap.engine.workers import WorkerGone, WorkerRelay, merge_logs
from hotswap.service import log_config as _logs
from hotswap.service.edge import channel_options
from hotswap.v1 import fleet_pb2, fleet_pb2_grpc, types_pb2

log = logging.getLogger(__name__)

# A worker's failed prepare, as the error process 0 reports it with (the same cause).
_ERRORS: dict[int, type[PrepareError]] = {
    _convert.failure_cause(error.cause): error for error in (BlobError, WarmupFailed, NotPrepared)
}

BACKOFF_START = 0.1
BACKOFF_MAX = 2.0
# How often a heartbeat's wait looks for new failures of split models (sent at once).
ERROR_CHECK_SECONDS = 0.05

# Answers the control plane's LogsQuery from this engine's inference log.
LogsAnswer = Callable[[types_pb2.GetLogsRequest], Awaitable[types_pb2.LogsResponse]]


# The furthest ahead a commit's switch instant is honoured (a clock far off must not hold
# a swap back).
MAX_SWITCH_LEAD = 1.0


def _until(switch_at_us: int) -> float:
    """Seconds from now (this engine's clock) to a commit's switch instant, 0 if passed."""
    if not switch_at_us:
        return 0.0
    return min(max(switch_at_us / 1e6 - time.time(), 0.0), MAX_SWITCH_LEAD)


def new_instance_id() -> str:
    """Tells this process's streams from another engine's under the same name."""
    return uuid.uuid4().hex


class BlobFetcher:
    """Fetches model blobs from the control plane (`Fleet.FetchBlob`), as this engine: what
    the engine's BlobCache reads through. Resumable by offset."""

    def __init__(self, channel: grpc.aio.Channel, token: str, name: str, instance_id: str):
        self._stub = fleet_pb2_grpc.FleetStub(channel)
        # The engine credential, sent on every Fleet call (never logged).
        self._auth = (("authorization", f"Bearer {token}"),) if token else ()
        self._name = name
        self._instance_id = instance_id

    async def fetch(self, sha256: str, offset: int) -> AsyncIterator[bytes]:
        request = fleet_pb2.FetchBlobRequest(
            sha256=sha256, offset=offset, engine=self._name, instance_id=self._instance_id
        )
        try:
            async for chunk in self._stub.FetchBlob(request, metadata=self._auth):
                yield chunk.data
        except grpc.aio.AioRpcError as exc:
            raise BlobError(
                f"could not fetch model blob {sha256[:12]} from the control plane: "
                f"{exc.code().name} {exc.details()}"
            ) from None


class ControlLink:
    def __init__(
        self,
        host: EngineHost,
        control: str,
        name: str,
        address: str,
        heartbeat_interval: float,
        metrics: EngineMetrics | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
        token: str = "",
        rules: access.Rules | None = None,
        logs: LogsAnswer | None = None,
        instance_id: str = "",
        relay: WorkerRelay | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        self._labels = dict(labels or {})
        # Why this engine is shutting down, once it is (in the Hello of every new stream), and
        # the control plane's answer: set once it moved what it could; `kept` is the rest.
        self.draining = ""
        self.drained = asyncio.Event()
        self.kept: frozenset[str] = frozenset()
        # When each Commit arrived (Unix µs), for its answer.
        self._received_at_us: dict[str, int] = {}
        # This engine's worker processes, which every message reaches too (engine/workers.py).
        self._relay = relay
        self._revision = 0  # the last desired state revision applied
        if relay is not None:
            relay.serving = self.serving_state
        self._logs = logs
        self._metrics = metrics or EngineMetrics()
        # The engine credential, sent on every Fleet call (never logged).
        self._auth = (("authorization", f"Bearer {token}"),) if token else ()
        self._host = host
        self._rules = rules or access.Rules(fail_closed=bool(token))
        self.instance_id = instance_id or new_instance_id()
        self._control = control
        self.name = name
        self.address = address
        # Where this engine serves HTTP, told in the Hello (set once its port is bound).
        self.http_address = ""
        self._heartbeat_interval = heartbeat_interval
        self._channel = channel or grpc.aio.insecure_channel(control, options=channel_options())
        self._stub = fleet_pb2_grpc.FleetStub(self._channel)
        self.connected = asyncio.Event()
        self._outbox: asyncio.Queue[fleet_pb2.EngineMessage] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- stream ---------------------------------------------------------------------------

    def _send(self, message: fleet_pb2.EngineMessage) -> None:
        self._outbox.put_nowait(message)

    def _state(self, revision: int = 0) -> fleet_pb2.StateReport:
        return fleet_pb2.StateReport(
            revision=revision,
            serving=[_convert.serving_pipeline(s) for s in self._host.states()],
        )

    def _report(self, revision: int = 0) -> None:
        self._send(fleet_pb2.EngineMessage(state=self._state(revision)))

    async def _requests(self) -> AsyncIterator[fleet_pb2.EngineMessage]:
        yield fleet_pb2.EngineMessage(
            hello=fleet_pb2.Hello(
                name=self.name,
                address=self.address,
                http_address=self.http_address,
                serving=[_convert.serving_pipeline(s) for s in self._host.states()],
                instance_id=self.instance_id,
                labels=self._labels,
                draining=bool(self.draining),
            )
        )
        while True:
            yield await self._outbox.get()

    async def run_forever(self) -> None:
        backoff = BACKOFF_START
        while True:
            started = time.monotonic()
            try:
                await self._stream()
            except grpc.aio.AioRpcError as exc:
                log.warning(
                    "control plane %s unreachable (%s); serving what we have, retrying",
                    self._control,
                    exc.code().name,
                )
            finally:
                self.connected.clear()
                for task in self._tasks:
                    task.cancel()
            if time.monotonic() - started > 10:
                backoff = BACKOFF_START
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _stream(self) -> None:
        # A fresh outbox per stream: stale answers for a previous session mean nothing now,
        # and swaps prepared for a previous stream will never be committed.
        self._outbox = asyncio.Queue()
        self._received_at_us.clear()
        self._host.abort_all()
        if self._relay is not None:
            self._relay.abort_all()
        call = self._stub.Connect(self._requests(), metadata=self._auth)
        beat = self._spawn(self._heartbeat_forever())
        try:
            async for message in call:
                if not self.connected.is_set():
                    log.info("connected to control plane %s as %s", self._control, self.name)
                    self.connected.set()
                self._dispatch(message)
        finally:
            beat.cancel()
            call.cancel()

    def drain(self, reason: str) -> None:
        """Tells the control plane this engine is shutting down, now and in the Hello of every
        reconnect: it moves this engine's pipelines elsewhere and then releases them here."""
        if not self.draining:
            self.draining = reason
            self._send(fleet_pb2.EngineMessage(drain=fleet_pb2.Drain(reason=reason)))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def heartbeat(self) -> fleet_pb2.Heartbeat:
        """A heartbeat with this engine's counts so far, its workers' included."""
        beat = fleet_pb2.Heartbeat(sent_ms=int(time.time() * 1000))
        for spec, counts in self._host.traffic():
            beat.traffic.extend(_convert.traffic(spec, counts))
        beat.versions.extend(self._version_traffic())
        if self._relay is not None:
            beat.traffic.extend(self._relay.traffic())
            beat.versions.extend(self._relay.versions())
        return beat

    async def _heartbeat_forever(self) -> None:
        while True:
            beat = self.heartbeat()
            self._send(fleet_pb2.EngineMessage(heartbeat=beat))
            # A new failure of a split model goes out at once, not a heartbeat later: a
            # rollout rolls back on it, and every moment more requests meet that model.
            errors = sum(t.errors for t in beat.traffic)
            deadline = time.monotonic() + self._heartbeat_interval
            while (left := deadline - time.monotonic()) > 0:
                now = self._split_errors()
                if now is None:
                    # Nothing to watch: sleep until the next beat or the next swap (which
                    # may load split steps), instead of waking 20 times a second.
                    await self._wait_for_change(left)
                elif now != errors:
                    break
                else:
                    await asyncio.sleep(min(ERROR_CHECK_SECONDS, left))

    async def _wait_for_change(self, seconds: float) -> None:
        seen = self._host.changes.count
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._host.changes.wait_after(seen), seconds)

    def _version_traffic(self) -> list[fleet_pb2.VersionTraffic]:
        """The request counts of the versions loaded now (not of every version ever served,
        so a heartbeat stays a few entries long), for the control plane's requests/s."""
        found = []
        for loaded in self._host.loaded_versions():
            bound = self._metrics.bound_of(loaded.spec.version_id)
            if bound is not None:
                found.append(_convert.version_traffic(loaded.spec, bound))
        return found

    def _split_errors(self) -> int | None:
        """Failures counted so far by the models of split steps, workers' included; None
        when no split step serves here (one read of the counts answers both)."""
        own = self._host.traffic()
        workers = self._relay.traffic() if self._relay is not None else []
        if not own and not workers:
            return None
        errors = int(sum(snap[2] for _, counts in own for *_, snap in counts))
        return errors + sum(t.errors for t in workers)

    def _dispatch(self, message: fleet_pb2.ControlMessage) -> None:
        kind = message.WhichOneof("kind")
        if kind == "access" and self._relay is not None:
            self._relay.access(message.access)
        if kind == "access":
            self._rules.update(
                message.access.required,
                (
                    access.Grant(g.name, g.token_sha256, frozenset(g.workspaces))
                    for g in message.access.grants
                ),
            )
        elif kind == "drained":
            self.kept = frozenset(message.drained.kept)
            self.drained.set()
        elif kind == "logs":
            self._spawn(self._answer_logs(message.logs))
        elif kind == "desired":
            # Which swaps this state has seen is fixed now, as it arrives (engine/host.py).
            self._spawn(self._apply_desired(message.desired, self._host.swaps_seen()))
        elif kind == "prepare":
            self._spawn(self._prepare(message.prepare))
        elif kind == "commit" and self._relay is not None:
            self._received_at_us[message.commit.swap_id] = time.time_ns() // 1000
            self._spawn(self._commit_everywhere(message.commit, self._relay))
        elif kind == "commit":
            commit = message.commit
            self._received_at_us[commit.swap_id] = time.time_ns() // 1000
            delay = _until(commit.switch_at_us)
            if delay > 0 and self._schedule(commit):
                asyncio.get_running_loop().call_later(delay, self._commit_now, commit)
            else:
                self._commit_now(commit)
        elif kind == "abort":
            token = _logs.request_id.set(message.abort.request_id)
            try:
                if self._relay is not None:
                    self._relay.abort(message.abort)
                self._host.abort(message.abort.swap_id)
                self._metrics.swaps.labels("aborted").inc()
                log.info("swap %s aborted: %s", message.abort.swap_id, message.abort.reason)
            finally:
                _logs.request_id.reset(token)

    def _schedule(self, commit: fleet_pb2.Commit) -> bool:
        """Requests after the commit's instant meet the new version even before the timer
        fires. False when there is nothing to schedule (the commit then fails as usual)."""
        try:
            self._host.schedule(commit.swap_id, commit.switch_at_us)
        except PrepareError:
            return False
        return True

    def _commit_now(self, commit: fleet_pb2.Commit) -> None:
        token = _logs.request_id.set(commit.request_id)
        try:
            self._commit(commit)
        finally:
            _logs.request_id.reset(token)

    async def _answer_logs(self, query: fleet_pb2.LogsQuery) -> None:
        result = fleet_pb2.LogsResult(query_id=query.query_id)
        try:
            if self._logs is not None:
                own = await self._logs(query.request)
                if self._relay is not None:
                    others = await self._relay.logs(query)
                    own = merge_logs(own, others, query.request.limit or 100)
                result.logs.CopyFrom(own)
        except (EngineError, WorkerGone, RuntimeError, pa.ArrowException) as exc:
            result.error = str(exc)
        self._send(fleet_pb2.EngineMessage(logs=result))

    async def _apply_desired(
        self, desired: fleet_pb2.DesiredState, seen: dict[str, int] | None = None
    ) -> None:
        refs = [_convert.version_ref(v) for v in desired.pipelines]
        if not self._host.serves_all(refs):
            # Shows "Loading" while it builds; nothing applied yet (revision 0). Not sent
            # when there is nothing to build: every message costs both sides CPU.
            self._report()
        if self._relay is None:
            await self._host.reconcile(refs, seen)
        else:  # applied once every process has applied it
            try:
                await asyncio.gather(
                    self._host.reconcile(refs, seen), self._relay.apply_desired(desired)
                )
            except WorkerGone as exc:  # not applied everywhere: not reported as applied
                log.error(
                    "desired state %d not applied by every process: %s", desired.revision, exc
                )
                return
        self._revision = max(self._revision, desired.revision)
        self._report(desired.revision)  # applied: the control plane's waiters may go on
        served = {tuple(s.key.split("/", 1)) for s in self._host.states()}
        self._metrics.forget_except({(w, p) for w, p in served})

    async def _prepare(self, prepare: fleet_pb2.Prepare) -> None:
        ref = _convert.version_ref(prepare.version)
        # This runs in a task of its own: the context variables stay with this swap.
        _logs.request_id.set(prepare.request_id)
        _logs.pipeline.set(ref.key)
        _logs.version.set(ref.number)
        try:
            done = await self._prepare_everywhere(prepare, ref)
        except PrepareError as exc:
            self._metrics.swap_failed(exc.cause)
            log.error("prepare %s of %s v%d failed: %s", prepare.swap_id, ref.key, ref.number, exc)
            failed = fleet_pb2.PrepareResult(
                swap_id=prepare.swap_id, error=str(exc), cause=_convert.failure_cause(exc.cause)
            )
            self._send(fleet_pb2.EngineMessage(prepared=failed))
            return
        except Exception as exc:
            self._metrics.swap_failed("unexpected")
            log.exception("prepare %s failed unexpectedly", prepare.swap_id)
            unexpected = fleet_pb2.PrepareResult(
                swap_id=prepare.swap_id,
                error=f"unexpected {type(exc).__name__}: {exc}",
                cause=fleet_pb2.FAILURE_CAUSE_UNEXPECTED,
            )
            self._send(fleet_pb2.EngineMessage(prepared=unexpected))
            return
        self._observe_prepared(done.fetch_ms, done.load_ms, done.warmup_ms, done.reused)
        log.info(
            "prepared %s v%d (swap %s): fetch %.1f ms, load %.1f ms, warm-up %.1f ms%s",
            ref.key,
            ref.number,
            prepare.swap_id,
            done.fetch_ms,
            done.load_ms,
            done.warmup_ms,
            " (reused)" if done.reused else "",
        )
        ready = fleet_pb2.PrepareResult(
            swap_id=prepare.swap_id,
            ok=True,
            fetch_ms=done.fetch_ms,
            load_ms=done.load_ms,
            warmup_ms=done.warmup_ms,
            reused=done.reused,
        )
        self._send(fleet_pb2.EngineMessage(prepared=ready))

    async def _prepare_everywhere(self, prepare: fleet_pb2.Prepare, ref: Any) -> Prepared:
        """This process's prepare and, with workers, theirs: prepared when all are."""
        if self._relay is None:
            return await self._host.prepare(prepare.swap_id, ref)
        try:
            done, answers = await asyncio.gather(
                self._host.prepare(prepare.swap_id, ref), self._relay.prepare(prepare)
            )
        except WorkerGone as exc:
            self._host.abort(prepare.swap_id)
            self._relay.abort(fleet_pb2.Abort(swap_id=prepare.swap_id, reason=str(exc)))
            raise PrepareError(f"a worker process could not prepare: {exc}") from None
        failed = next((a for a in answers if not a.ok), None)
        if failed is not None:
            self._host.abort(prepare.swap_id)
            self._relay.abort(fleet_pb2.Abort(swap_id=prepare.swap_id, reason=failed.error))
            error = _ERRORS.get(failed.cause, PrepareError)
            raise error(f"a worker process: {failed.error}")
        return done

    async def _commit_everywhere(self, commit: fleet_pb2.Commit, relay: WorkerRelay) -> None:
        """Commits here and in every worker; answered once all have switched, so a client
        that sees Deploy return reads the new version from any process."""
        _logs.request_id.set(commit.request_id)
        # This process switches at the same instant as its workers (they schedule it too),
        # not once they have answered.
        if _until(commit.switch_at_us) > 0:
            self._schedule(commit)
        try:
            answers = await relay.commit(commit)
        except WorkerGone as exc:
            answers = [fleet_pb2.CommitResult(swap_id=commit.swap_id, error=str(exc))]
        except BaseException:
            self._received_at_us.pop(commit.swap_id, None)
            raise
        failed = next((a for a in answers if not a.ok), None)
        # Past the commit point process 0 switches even when a worker could not, and the
        # workers are told what it now serves, so the engine converges on the new version;
        # the failure goes to the control plane, which leaves this engine's address out
        # of the endpoints until it reports the version.
        self._commit(commit, failed)
        if failed is not None:
            relay.resync(self.serving_state())

    def serving_state(self) -> fleet_pb2.DesiredState:
        """What this process serves, as a desired state (for its worker processes)."""
        pipelines = [
            _convert.pipeline_version(state.active.spec)
            for state in self._host.states()
            if state.active is not None
        ]
        return fleet_pb2.DesiredState(revision=self._revision, pipelines=pipelines)

    def _observe_prepared(
        self, fetch_ms: float, load_ms: float, warmup_ms: float, reused: bool
    ) -> None:
        self._metrics.swaps.labels("reused" if reused else "prepared").inc()
        if not reused:
            stage = self._metrics.swap_stage_seconds.labels
            stage("fetch").observe(fetch_ms / 1000)
            stage("build").observe(load_ms / 1000)
            stage("warmup").observe(warmup_ms / 1000)

    def _commit(
        self, commit: fleet_pb2.Commit, worker_failed: fleet_pb2.CommitResult | None = None
    ) -> None:
        before = {s.key: s.active for s in self._host.states() if s.active is not None}
        try:
            switch_us = self._host.commit(commit.swap_id)
        except PrepareError as exc:
            self._received_at_us.pop(commit.swap_id, None)
            self._metrics.swap_failed(exc.cause)
            failed_commit = fleet_pb2.CommitResult(
                swap_id=commit.swap_id, error=str(exc), cause=_convert.failure_cause(exc.cause)
            )
            self._send(fleet_pb2.EngineMessage(committed=failed_commit))
            return
        self._metrics.swaps.labels("committed").inc()
        self._metrics.swap_stage_seconds.labels("commit").observe(switch_us / 1e6)
        released = self._metrics.released_after(time.monotonic())
        for state in self._host.states():
            old = before.get(state.key)
            if old is not None and state.active is not old:
                # Fires when the last in-flight request (or the retention) lets go of it.
                weakref.finalize(old, released)
        # What we serve now rides on the answer: the control plane knows it by the time it
        # sees the commit answer (GetPipelineEndpoints after Deploy returns must include us).
        if worker_failed is None:
            answer = fleet_pb2.CommitResult(
                swap_id=commit.swap_id,
                ok=True,
                switch_us=switch_us,
                switched_at_us=self._host.switched_at_us,
                received_at_us=self._received_at_us.pop(commit.swap_id, 0),
                state=self._state(),
            )
        else:
            self._received_at_us.pop(commit.swap_id, None)
            answer = fleet_pb2.CommitResult(
                swap_id=commit.swap_id,
                error=f"a worker process: {worker_failed.error}",
                cause=worker_failed.cause or fleet_pb2.FAILURE_CAUSE_UNEXPECTED,
                state=self._state(),
            )
        self._send(fleet_pb2.EngineMessage(committed=answer))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await self._channel.close()
