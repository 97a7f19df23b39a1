"""The swap coordinator: two-phase deploys across engines, and undeploys.

Deploy = prepare on every assigned engine (old version keeps serving), then — only if all
prepared — record the new version as desired (the commit point, in SQLite) and commit on every
engine. Any prepare failure or timeout, or the caller cancelling before the commit point,
aborts everywhere and changes nothing; past the commit point the swap completes even if the
caller has gone, and engines that did not confirm are named in the result.

An engine that replaces a lost one gets the deployment the same way: a redeploy of the current
version under the pipeline's lock, prepared before it is committed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass

from hotswap.control import _convert
from hotswap.control.domain import Deployment, PipelineVersion, pipeline_key
from hotswap.control.errors import DeployConflict, DeployFailed, NoEngines
from hotswap.control.fleet import EngineGone, EngineSession, Fleet
from hotswap.control.metrics import ControlMetrics
from hotswap.control.store import Store
from hotswap.control.timeline import EngineStage, Swap, SwapTimeline, swap_kind
from hotswap.v1 import fleet_pb2

log = logging.getLogger(__name__)

# Seconds between two attempts to give a pipeline's lost replicas to spare engines.
REFILL_BACKOFF = 10.0


@dataclass(frozen=True, slots=True)
class EngineTiming:
    engine: str
    address: str
    prepare_ms: float
    fetch_ms: float
    load_ms: float
    warmup_ms: float
    commit_ms: float
    switch_us: float
    reused: bool


@dataclass(frozen=True, slots=True)
class DeployResult:
    version: PipelineVersion
    previous: PipelineVersion | None
    engines: tuple[EngineTiming, ...]
    prepare_ms: float
    commit_ms: float
    total_ms: float
    # Engines that did not confirm the commit (they converge from their desired state).
    unconfirmed: tuple[str, ...] = ()


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


class Deployer:
    def __init__(
        self,
        store: Store,
        fleet: Fleet,
        *,
        prepare_timeout: float,
        commit_timeout: float,
        timeline: SwapTimeline | None = None,
        metrics: ControlMetrics | None = None,
    ) -> None:
        self._store = store
        self._fleet = fleet
        self._timeline = timeline
        self._metrics = metrics or ControlMetrics()
        # The swap running per pipeline key, for GetPipelineStatus.
        self.running: dict[str, Swap] = {}
        self._prepare_timeout = prepare_timeout
        self._commit_timeout = commit_timeout
        # Deploys of one pipeline run one at a time; different pipelines swap concurrently.
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._revision = int(time.time() * 1000)
        self._started = time.monotonic()
        self._background: set[asyncio.Task[None]] = set()
        self._refilling: set[str] = set()
        self._refilled_at: dict[str, float] = {}
        fleet.on_connect = self._assign_to_new_engine

    # -- desired state (level-triggered) -------------------------------------------------

    def desired_state(self, engine: str) -> fleet_pb2.DesiredState:
        """Everything `engine` must serve now, per the store."""
        return fleet_pb2.DesiredState(
            revision=self._revision,
            pipelines=[
                _convert.pipeline_version(d.version)
                for d in self._store.deployments()
                if engine in d.engines
            ],
        )

    def _bump(self, engines: set[str]) -> None:
        self._revision += 1
        for name in sorted(engines):
            self._fleet.send_desired(name)

    def _lacking_replicas(self) -> list[Deployment]:
        """Deployments with fewer live engines than replicas (after a control-plane restart,
        engines that have not reconnected yet still count: they are still serving)."""
        starting = time.monotonic() - self._started < 2 * self._fleet.lost_after
        live = {s.name for s in self._fleet.live()}
        return [
            d
            for d in self._store.deployments()
            if len(
                [e for e in d.engines if e in live or (starting and e not in self._fleet.sessions)]
            )
            < d.replicas
        ]

    def _assign_to_new_engine(self, engine: str) -> None:
        """Gives deployments that lack replicas to a (re)connecting engine, each by a full
        two-phase redeploy under the pipeline's lock (never by assignment alone)."""
        for deployment in self._lacking_replicas():
            if engine not in deployment.engines:
                self._start_refill(deployment)

    def refill_lost(self) -> None:
        """Moves replicas of lost engines to live spares (called once per heartbeat). A
        pipeline is tried again at most every `REFILL_BACKOFF` seconds."""
        live = {s.name for s in self._fleet.live()}
        for deployment in self._lacking_replicas():
            if live - set(deployment.engines):
                self._start_refill(deployment)

    def _start_refill(self, deployment: Deployment) -> None:
        key = deployment.version.key
        now = time.monotonic()
        if (
            key in self._refilling
            or now - self._refilled_at.get(key, -REFILL_BACKOFF) < REFILL_BACKOFF
        ):
            return
        self._refilling.add(key)
        self._refilled_at[key] = now
        task = asyncio.ensure_future(self._refill(deployment))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda _: self._refilling.discard(key))

    async def _refill(self, deployment: Deployment) -> None:
        version = deployment.version
        try:
            await self.deploy(
                version.workspace,
                version.pipeline,
                version.number,
                deployment.replicas,
                version.number,
                requested_by="control plane (replacing lost engines)",
            )
        except (DeployConflict, DeployFailed, NoEngines) as exc:
            # Another deploy moved on, or the engine could not prepare: the timeline says which.
            log.warning("could not refill replicas of %s: %s", version.key, exc)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    # -- deploy -----------------------------------------------------------------------------

    def _choose_engines(self, current: Deployment | None, replicas: int) -> list[EngineSession]:
        live = self._fleet.live()
        if not live:
            raise NoEngines(
                "no engine is connected to the control plane: start one with "
                "'hotswap engine --control HOST:PORT' (or use 'hotswap up')"
            )
        assigned = set(current.engines) if current else set()
        load: defaultdict[str, int] = defaultdict(int)
        for deployment in self._store.deployments():
            for name in deployment.engines:
                load[name] += 1
        # Engines already serving the pipeline first (no cold start), then the least loaded.
        ranked = sorted(live, key=lambda s: (s.name not in assigned, load[s.name], s.name))
        return ranked[:replicas]

    async def deploy(
        self,
        workspace: str,
        pipeline: str,
        number: int,
        replicas: int,
        expected_current: int | None,
        *,
        requested_by: str = "",
        request_id: str = "",
    ) -> DeployResult:
        started = time.perf_counter()
        async with self._locks[pipeline_key(workspace, pipeline)]:
            version = self._store.pipeline_version(workspace, pipeline, number)
            current = self._store.get_pipeline(workspace, pipeline).deployment
            current_number = current.version.number if current else 0
            swap = Swap(
                str(uuid.uuid4()),
                workspace,
                pipeline,
                swap_kind(current_number, version.number),
                current_number,
                version.number,
                requested_by,
                request_id,
            )
            try:
                result = await self._swap(swap, version, current, replicas, expected_current)
            except (DeployConflict, NoEngines) as exc:
                self._finish(swap, started, "rejected", str(exc))
                raise
            except DeployFailed as exc:
                self._finish(swap, started, "aborted", str(exc))
                raise
            except asyncio.CancelledError:
                if swap.committed:  # the swap finished for a caller who left
                    self._finish(swap, started, "ok", "the caller cancelled after the commit point")
                else:
                    self._finish(swap, started, "aborted", "the caller cancelled the deploy")
                raise
            except BaseException as exc:
                self._finish(swap, started, "aborted", f"unexpected {type(exc).__name__}: {exc}")
                raise
            self._finish(swap, started, "ok", _unconfirmed_reason(result.unconfirmed))
        return result

    def _finish(self, swap: Swap, started: float, outcome: str, reason: str = "") -> None:
        swap.finish(outcome, reason)
        self.running.pop(pipeline_key(swap.workspace, swap.pipeline), None)
        if self._timeline is not None:
            self._timeline.write(swap)
        seconds = time.perf_counter() - started
        self._metrics.deploys.labels(swap.kind, outcome).inc()
        self._metrics.deploy_seconds.labels(outcome).observe(seconds)

    async def _swap(
        self,
        swap: Swap,
        version: PipelineVersion,
        current: Deployment | None,
        replicas: int,
        expected_current: int | None,
    ) -> DeployResult:
        started = time.perf_counter()
        current_number = current.version.number if current else 0
        if expected_current is not None and expected_current != current_number:
            raise DeployConflict(
                f"pipeline {version.pipeline!r} is at version {current_number}, not "
                f"{expected_current}: someone else deployed first; reload and retry"
            )
        replicas = replicas or (current.replicas if current else 1)
        engines = self._choose_engines(current, replicas)
        swap_id = swap.swap_id
        swap.engines = {e.name: EngineStage(e.name, e.address) for e in engines}
        self.running[version.key] = swap
        if self._timeline is not None:
            self._timeline.write(swap)
        log.info(
            "deploy %s v%d (swap %s) on %s",
            version.key,
            version.number,
            swap_id,
            ", ".join(e.name for e in engines),
        )

        prepare_start = time.perf_counter()
        try:
            await self._prepare_all(engines, swap, version, current)
        except asyncio.CancelledError:
            self._abort_all(engines, swap, "the caller cancelled the deploy")
            raise
        swap.prepare_ms = prepare_ms = _ms_since(prepare_start)
        self._metrics.swap_phase_seconds.labels("prepare").observe(prepare_ms / 1000)

        # Commit point: from here the new version is what every engine must serve, and the
        # commit runs to its end even if the caller cancels (it is shielded below).
        self._store.set_deployment(version, replicas, [e.name for e in engines])
        swap.committed = True
        commit_start = time.perf_counter()
        commit = asyncio.ensure_future(self._commit_all(engines, swap))
        try:
            await asyncio.shield(commit)
        except asyncio.CancelledError:
            await commit
            raise
        finally:
            dropped = set(current.engines if current else ()) - {e.name for e in engines}
            self._bump(dropped | {e.name for e in engines})
        swap.commit_ms = commit_ms = _ms_since(commit_start)
        self._metrics.swap_phase_seconds.labels("commit").observe(commit_ms / 1000)

        timings = tuple(
            EngineTiming(
                engine=st.engine,
                address=st.address,
                prepare_ms=st.prepare_ms,
                fetch_ms=st.fetch_ms,
                load_ms=st.load_ms,
                warmup_ms=st.warmup_ms,
                commit_ms=st.commit_ms,
                switch_us=st.switch_us,
                reused=st.reused,
            )
            for st in swap.engines.values()
        )
        unconfirmed = tuple(st.engine for st in swap.engines.values() if st.stage != "committed")
        return DeployResult(
            version,
            current.version if current else None,
            timings,
            prepare_ms,
            commit_ms,
            _ms_since(started),
            unconfirmed,
        )

    async def _prepare_one(
        self, engine: EngineSession, swap: Swap, version: PipelineVersion
    ) -> None:
        stage = swap.engines[engine.name]
        try:
            stage.prepare_ms, answer = await self._ask_prepare(engine, swap, version)
        except DeployFailed as exc:
            stage.stage, stage.error = "failed", str(exc)
            raise
        stage.stage = "prepared"
        stage.fetch_ms, stage.load_ms = answer.fetch_ms, answer.load_ms
        stage.warmup_ms, stage.reused = answer.warmup_ms, answer.reused
        observe = self._metrics.engine_stage_seconds.labels
        observe("prepare").observe(stage.prepare_ms / 1000)
        if not answer.reused:
            observe("fetch").observe(answer.fetch_ms / 1000)
            observe("build").observe(answer.load_ms / 1000)
            observe("warmup").observe(answer.warmup_ms / 1000)

    async def _ask_prepare(
        self, engine: EngineSession, swap: Swap, version: PipelineVersion
    ) -> tuple[float, fleet_pb2.PrepareResult]:
        start = time.perf_counter()
        swap_id = swap.swap_id
        message = fleet_pb2.ControlMessage(
            prepare=fleet_pb2.Prepare(
                swap_id=swap_id,
                version=_convert.pipeline_version(version),
                request_id=swap.request_id,
            )
        )
        try:
            answer = await self._fleet.ask(
                engine, message, ("prepare", swap_id), self._prepare_timeout
            )
        except TimeoutError:
            raise DeployFailed(
                f"engine {engine.name} did not prepare within {self._prepare_timeout:g}s "
                "(raise --prepare-timeout for large models, or check the engine)"
            ) from None
        except EngineGone as exc:
            raise DeployFailed(f"{exc} while preparing") from None
        if not answer.prepared.ok:
            raise DeployFailed(f"engine {engine.name} failed to prepare: {answer.prepared.error}")
        return _ms_since(start), answer.prepared

    async def _prepare_all(
        self,
        engines: list[EngineSession],
        swap: Swap,
        version: PipelineVersion,
        current: Deployment | None,
    ) -> None:
        tasks = [asyncio.ensure_future(self._prepare_one(e, swap, version)) for e in engines]
        # Wait for the first failure, not for every engine: a stalled one must not delay abort.
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            raise
        failure = next((t.exception() for t in done if t.exception() is not None), None)
        if failure is None:
            return
        for task in pending:
            task.cancel()
        self._abort_all(engines, swap, str(failure))
        kept = f"version {current.version.number} keeps serving" if current else "nothing changed"
        log.warning("deploy %s v%d aborted: %s", version.key, version.number, failure)
        raise DeployFailed(
            f"deploy of {version.pipeline!r} version {version.number} aborted: {failure}; {kept}"
        )

    def _abort_all(self, engines: list[EngineSession], swap: Swap, reason: str) -> None:
        abort = fleet_pb2.ControlMessage(
            abort=fleet_pb2.Abort(swap_id=swap.swap_id, reason=reason, request_id=swap.request_id)
        )
        for engine in engines:
            self._fleet.send(engine, abort)

    async def _commit_one(self, engine: EngineSession, swap: Swap) -> None:
        start = time.perf_counter()
        stage = swap.engines[engine.name]
        stage.stage = "committing"
        swap_id = swap.swap_id
        message = fleet_pb2.ControlMessage(
            commit=fleet_pb2.Commit(swap_id=swap_id, request_id=swap.request_id)
        )
        try:
            answer = await self._fleet.ask(
                engine, message, ("commit", swap_id), self._commit_timeout
            )
        except (TimeoutError, EngineGone) as exc:
            # Past the commit point the engine converges from its desired state on reconnect;
            # until then GetPipelineEndpoints leaves it out, so reads still see the new version.
            log.warning("engine %s did not confirm commit %s: %s", engine.name, swap_id, exc)
            stage.stage, stage.error = "failed", f"no commit confirmation: {exc or 'timeout'}"
            stage.commit_ms = stage.switch_us = -1.0
            return
        stage.commit_ms, stage.switch_us = _ms_since(start), answer.committed.switch_us
        if answer.committed.ok:
            stage.stage = "committed"
        else:
            stage.stage, stage.error = "failed", answer.committed.error
        self._metrics.engine_stage_seconds.labels("commit").observe(stage.commit_ms / 1000)

    async def _commit_all(self, engines: list[EngineSession], swap: Swap) -> None:
        await asyncio.gather(*(self._commit_one(e, swap) for e in engines))

    # -- undeploy -------------------------------------------------------------------------

    async def undeploy(
        self,
        workspace: str,
        pipeline: str,
        timeout: float | None = None,
        *,
        requested_by: str = "",
        request_id: str = "",
    ) -> list[str]:
        """Undeploys; returns the engines that did not confirm the release within `timeout`
        (they release it when they next apply their desired state)."""
        started = time.perf_counter()
        async with self._locks[pipeline_key(workspace, pipeline)]:
            current = self._store.get_pipeline(workspace, pipeline).deployment
            before = current.version.number if current else 0
            swap = Swap(
                str(uuid.uuid4()),
                workspace,
                pipeline,
                "undeploy",
                before,
                0,
                requested_by,
                request_id,
            )
            try:
                unconfirmed = await self._undeploy(swap, timeout or self._commit_timeout)
            except DeployFailed as exc:
                self._finish(swap, started, "rejected", str(exc))
                raise
            self._finish(swap, started, "ok", _unconfirmed_reason(unconfirmed, "release"))
        return unconfirmed

    async def _undeploy(self, swap: Swap, timeout: float) -> list[str]:
        workspace, pipeline = swap.workspace, swap.pipeline
        previous = self._store.delete_deployment(workspace, pipeline)
        if previous is None:
            raise DeployFailed(f"pipeline {pipeline!r} is not deployed")
        for name in previous.engines:
            session = self._fleet.sessions.get(name)
            stage = EngineStage(name, session.address if session else "", "committed")
            swap.engines[name] = stage
        key = previous.version.key
        waits = {}
        for name in previous.engines:
            session = self._fleet.sessions.get(name)
            if session is not None and session.connected:
                waits[name] = asyncio.ensure_future(self._wait_released(session, key))
        self._bump(set(previous.engines))
        # Best effort: an engine that is away releases on reconnect (level-triggered).
        if waits:
            await asyncio.wait(waits.values(), timeout=timeout)
        unconfirmed = []
        for name in previous.engines:
            wait = waits.get(name)
            released = wait is not None and wait.done() and wait.result()
            if not released:
                unconfirmed.append(name)
                swap.engines[name].stage = "failed"
                swap.engines[name].error = "did not confirm the release"
            if wait is not None:
                wait.cancel()
        return unconfirmed

    @staticmethod
    async def _wait_released(session: EngineSession, key: str) -> bool:
        """True once the engine reports it no longer serves `key`; False if it disconnects."""
        while session.connected and key in session.serving:
            await session.reported.wait()
        return key not in session.serving


def _unconfirmed_reason(engines: tuple[str, ...] | list[str], what: str = "commit") -> str:
    if not engines:
        return ""
    return f"engines {', '.join(engines)} did not confirm the {what}; they converge on reconnect"
