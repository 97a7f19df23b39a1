"""The swap coordinator: two-phase deploys across engines, undeploys, and the live status.

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
from hotswap.control.store import Store
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


@dataclass(frozen=True, slots=True)
class ModelState:
    name: str
    version: str
    sha256: str
    status: str


@dataclass(frozen=True, slots=True)
class EngineView:
    name: str
    address: str
    status: str  # Running | Starting | Lost | Error
    reason: str
    serving_version: int
    models: tuple[ModelState, ...]
    last_seen_ms: int


@dataclass(frozen=True, slots=True)
class PipelineStatus:
    workspace: str
    pipeline: str
    status: str  # Running | Starting | Error | Undeployed
    details: str
    deployment: Deployment | None
    engines: tuple[EngineView, ...]


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
    ) -> None:
        self._store = store
        self._fleet = fleet
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
    ) -> DeployResult:
        started = time.perf_counter()
        async with self._locks[pipeline_key(workspace, pipeline)]:
            version = self._store.pipeline_version(workspace, pipeline, number)
            current = self._store.get_pipeline(workspace, pipeline).deployment
            current_number = current.version.number if current else 0
            if expected_current is not None and expected_current != current_number:
                raise DeployConflict(
                    f"pipeline {pipeline!r} is at version {current_number}, not "
                    f"{expected_current}: someone else deployed first; reload and retry"
                )
            replicas = replicas or (current.replicas if current else 1)
            engines = self._choose_engines(current, replicas)
            swap_id = str(uuid.uuid4())
            log.info(
                "deploy %s v%d (swap %s) on %s",
                version.key,
                version.number,
                swap_id,
                ", ".join(e.name for e in engines),
            )

            prepare_start = time.perf_counter()
            prepared = await self._prepare_all(engines, swap_id, version, current)
            prepare_ms = _ms_since(prepare_start)

            # Commit point: from here the new version is what every engine must serve.
            self._store.set_deployment(version, replicas, [e.name for e in engines])
            commit_start = time.perf_counter()
            committed = await self._commit_all(engines, swap_id)
            commit_ms = _ms_since(commit_start)
            dropped = set(current.engines if current else ()) - {e.name for e in engines}
            self._bump(dropped | {e.name for e in engines})

        timings = tuple(
            EngineTiming(
                engine=e.name,
                address=e.address,
                prepare_ms=prepared[e.name][0],
                fetch_ms=prepared[e.name][1].fetch_ms,
                load_ms=prepared[e.name][1].load_ms,
                warmup_ms=prepared[e.name][1].warmup_ms,
                commit_ms=committed[e.name][0],
                switch_us=committed[e.name][1],
                reused=prepared[e.name][1].reused,
            )
            for e in engines
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
        self, engine: EngineSession, swap_id: str, version: PipelineVersion
    ) -> tuple[float, fleet_pb2.PrepareResult]:
        start = time.perf_counter()
        message = fleet_pb2.ControlMessage(
            prepare=fleet_pb2.Prepare(swap_id=swap_id, version=_convert.pipeline_version(version))
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
        swap_id: str,
        version: PipelineVersion,
        current: Deployment | None,
    ) -> dict[str, tuple[float, fleet_pb2.PrepareResult]]:
        tasks = [asyncio.ensure_future(self._prepare_one(e, swap_id, version)) for e in engines]
        # Wait for the first failure, not for every engine: a stalled one must not delay abort.
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failure = next((t.exception() for t in done if t.exception() is not None), None)
        if failure is None:
            return {e.name: t.result() for e, t in zip(engines, tasks, strict=True)}
        for task in pending:
            task.cancel()
        abort = fleet_pb2.ControlMessage(
            abort=fleet_pb2.Abort(swap_id=swap_id, reason=str(failure))
        )
        for engine in engines:
            if engine.connected:
                engine.send(abort)
        kept = f"version {current.version.number} keeps serving" if current else "nothing changed"
        log.warning("deploy %s v%d aborted: %s", version.key, version.number, failure)
        raise DeployFailed(
            f"deploy of {version.pipeline!r} version {version.number} aborted: {failure}; {kept}"
        )

    async def _commit_one(self, engine: EngineSession, swap_id: str) -> tuple[float, float]:
        start = time.perf_counter()
        message = fleet_pb2.ControlMessage(commit=fleet_pb2.Commit(swap_id=swap_id))
        try:
            answer = await self._fleet.ask(
                engine, message, ("commit", swap_id), self._commit_timeout
            )
        except (TimeoutError, EngineGone) as exc:
            # Past the commit point the engine converges from its desired state on reconnect;
            # until then GetPipelineEndpoints leaves it out, so reads still see the new version.
            log.warning("engine %s did not confirm commit %s: %s", engine.name, swap_id, exc)
            return -1.0, -1.0
        return _ms_since(start), answer.committed.switch_us

    async def _commit_all(
        self, engines: list[EngineSession], swap_id: str
    ) -> dict[str, tuple[float, float]]:
        results = await asyncio.gather(*(self._commit_one(e, swap_id) for e in engines))
        return {e.name: r for e, r in zip(engines, results, strict=True)}

    # -- undeploy -------------------------------------------------------------------------

    async def undeploy(self, workspace: str, pipeline: str, timeout: float = 10.0) -> None:
        async with self._locks[pipeline_key(workspace, pipeline)]:
            previous = self._store.delete_deployment(workspace, pipeline)
            if previous is None:
                raise DeployFailed(f"pipeline {pipeline!r} is not deployed")
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

    # -- status ---------------------------------------------------------------------------

    def _engine_view(self, name: str, deployment: Deployment) -> EngineView:
        session = self._fleet.sessions.get(name)
        if session is None:
            return EngineView(name, "", "Lost", "engine has not connected", 0, (), 0)
        serving = session.serving.get(deployment.version.key)
        number = serving.number if serving else 0
        models = tuple(
            ModelState(m.name, m.version, m.sha256, "Running")
            for m in (serving.models if serving else ())
        )
        if session.lost(self._fleet.lost_after):
            status, reason = "Lost", "no heartbeat from the engine"
        elif serving is not None and serving.state == "Error":
            status, reason = "Error", serving.error
        elif serving is not None and serving.version_id == deployment.version.version_id:
            status, reason = "Running", ""
        else:
            status = "Starting"
            reason = f"loading version {deployment.version.number}"
        return EngineView(
            name, session.address, status, reason, number, models, session.last_seen_ms
        )

    def status(self, workspace: str, pipeline: str) -> PipelineStatus:
        deployment = self._store.get_pipeline(workspace, pipeline).deployment
        if deployment is None:
            return PipelineStatus(
                workspace, pipeline, "Undeployed", "pipeline is not deployed", None, ()
            )
        engines = tuple(self._engine_view(n, deployment) for n in deployment.engines)
        states = [e.status for e in engines]
        details = "; ".join(f"{e.name}: {e.reason}" for e in engines if e.status != "Running")
        if "Error" in states or not engines:
            status = "Error"
        elif "Starting" in states:
            status = "Starting"
        elif "Running" in states:
            status = "Running"  # possibly degraded: `details` names the lost engines
        else:
            status = "Error"  # every assigned engine is lost: nothing serves
        if status == "Running" and len(engines) < deployment.replicas:
            details = (
                f"{len(engines)} of {deployment.replicas} replicas: only {len(engines)} "
                "engine(s) were connected; start more engines to add replicas"
            )
        return PipelineStatus(workspace, pipeline, status, details, deployment, engines)

    def endpoints(self, workspace: str, pipeline: str) -> tuple[int, list[str]]:
        """The deployed version and the engines serving exactly it now."""
        deployment = self._store.get_pipeline(workspace, pipeline).deployment
        if deployment is None:
            raise DeployFailed(f"pipeline {pipeline!r} is not deployed: deploy it first")
        addresses = [
            view.address
            for view in (self._engine_view(n, deployment) for n in deployment.engines)
            if view.status == "Running"
        ]
        return deployment.version.number, addresses
