"""The swap coordinator: two-phase deploys across engines, and undeploys.

Deploy = prepare on every assigned engine (old version keeps serving), then — only if all
prepared — record the new version as desired (the commit point, in SQLite) and commit on every
engine. Any prepare failure or timeout aborts everywhere and changes nothing.
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

    def _assign_to_new_engine(self, engine: str) -> None:
        """Gives a (re)connecting engine the deployments that lack replicas."""
        # Right after a control plane restart, assigned engines have not reconnected yet; they
        # are still serving, so moving their pipelines elsewhere would only cause churn.
        starting = time.monotonic() - self._started < 2 * self._fleet.lost_after
        live = {s.name for s in self._fleet.live()}
        for deployment in self._store.deployments():
            if engine in deployment.engines:
                continue
            kept = [
                e
                for e in deployment.engines
                if e in live or (starting and e not in self._fleet.sessions)
            ]
            if len(kept) < deployment.replicas:
                log.info("assigning %s to engine %s", deployment.version.key, engine)
                self._store.set_deployment(deployment.version, deployment.replicas, [*kept, engine])
                self._revision += 1

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
            except BaseException as exc:
                self._finish(swap, started, "aborted", f"unexpected {type(exc).__name__}: {exc}")
                raise
            self._finish(swap, started, "ok")
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
        await self._prepare_all(engines, swap, version, current)
        swap.prepare_ms = prepare_ms = _ms_since(prepare_start)
        self._metrics.swap_phase_seconds.labels("prepare").observe(prepare_ms / 1000)

        # Commit point: from here the new version is what every engine must serve.
        self._store.set_deployment(version, replicas, [e.name for e in engines])
        commit_start = time.perf_counter()
        await self._commit_all(engines, swap)
        swap.commit_ms = commit_ms = _ms_since(commit_start)
        self._metrics.swap_phase_seconds.labels("commit").observe(commit_ms / 1000)
        dropped = set(current.engines if current else ()) - {e.name for e in engines}
        self._bump(dropped | {e.name for e in engines})

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
        return DeployResult(
            version,
            current.version if current else None,
            timings,
            prepare_ms,
            commit_ms,
            _ms_since(started),
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
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failure = next((t.exception() for t in done if t.exception() is not None), None)
        if failure is None:
            return
        for task in pending:
            task.cancel()
        abort = fleet_pb2.ControlMessage(
            abort=fleet_pb2.Abort(
                swap_id=swap.swap_id, reason=str(failure), request_id=swap.request_id
            )
        )
        for engine in engines:
            if engine.connected:
                engine.send(abort)
        kept = f"version {current.version.number} keeps serving" if current else "nothing changed"
        log.warning("deploy %s v%d aborted: %s", version.key, version.number, failure)
        raise DeployFailed(
            f"deploy of {version.pipeline!r} version {version.number} aborted: {failure}; {kept}"
        )

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
        timeout: float = 10.0,
        *,
        requested_by: str = "",
        request_id: str = "",
    ) -> None:
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
                await self._undeploy(swap, timeout)
            except DeployFailed as exc:
                self._finish(swap, started, "rejected", str(exc))
                raise
            except TimeoutError:
                self._finish(swap, started, "ok", "some engines did not confirm the release")
                raise
            self._finish(swap, started, "ok")

    async def _undeploy(self, swap: Swap, timeout: float) -> None:
        workspace, pipeline = swap.workspace, swap.pipeline
        previous = self._store.delete_deployment(workspace, pipeline)
        if previous is None:
            raise DeployFailed(f"pipeline {pipeline!r} is not deployed")
        for name in previous.engines:
            session = self._fleet.sessions.get(name)
            stage = EngineStage(name, session.address if session else "", "committed")
            swap.engines[name] = stage
        key = previous.version.key
        waits = []
        for name in previous.engines:
            session = self._fleet.sessions.get(name)
            if session is not None and session.connected:
                waits.append(self._wait_released(session, key))
        self._bump(set(previous.engines))
        # Best effort: an engine that is away releases on reconnect (level-triggered).
        await asyncio.wait_for(asyncio.gather(*waits), timeout)

    @staticmethod
    async def _wait_released(session: EngineSession, key: str) -> None:
        while session.connected and key in session.serving:
            await session.reported.wait()
