"""The live state of deployments, as clients see it: per-engine status, and the engines that
serve a pipeline's deployed version right now (what read-your-writes routing relies on)."""

from __future__ import annotations

from dataclasses import dataclass

from hotswap.control.domain import Deployment, pipeline_key
from hotswap.control.errors import DeployFailed
from hotswap.control.fleet import Fleet
from hotswap.control.rates import Rate
from hotswap.control.store import Store
from hotswap.control.timeline import Swap


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
    http_address: str = ""


@dataclass(frozen=True, slots=True)
class PipelineStatus:
    workspace: str
    pipeline: str
    status: str  # Running | Starting | Error | Undeployed
    details: str
    deployment: Deployment | None
    engines: tuple[EngineView, ...]
    swap: Swap | None = None  # the swap running now, if any
    rates: tuple[Rate, ...] = ()  # live requests/s and latency per version, newest first


class StatusBoard:
    def __init__(self, store: Store, fleet: Fleet, running: dict[str, Swap]) -> None:
        self._store = store
        self._fleet = fleet
        # The coordinator's swaps in progress, by pipeline key (shared, read only here).
        self._running = running

    def _engine_view(self, name: str, deployment: Deployment) -> EngineView:
        connection = self._fleet.connections.get(name)
        if connection is None:
            return EngineView(name, "", "Lost", "engine has not connected", 0, (), 0)
        serving = connection.serving.get(deployment.version.key)
        number = serving.number if serving else 0
        models = tuple(
            ModelState(m.name, m.version, m.sha256, "Running")
            for m in (serving.models if serving else ())
        )
        if connection.lost(self._fleet.lost_after):
            status, reason = "Lost", "no heartbeat from the engine"
        elif serving is not None and serving.state == "Error":
            status, reason = "Error", serving.error
        elif serving is not None and serving.version_id == deployment.version.version_id:
            status, reason = "Running", ""
        else:
            status = "Starting"
            reason = f"loading version {deployment.version.number}"
        return EngineView(
            name,
            connection.address,
            status,
            reason,
            number,
            models,
            connection.last_seen_ms,
            connection.http_address,
        )

    def status(self, workspace: str, pipeline: str) -> PipelineStatus:
        deployment = self._store.get_pipeline(workspace, pipeline).deployment
        assigned = deployment.engines if deployment is not None else ()
        rates = tuple(self._fleet.rates(workspace, pipeline, assigned))
        if deployment is None:
            running = self._running.get(pipeline_key(workspace, pipeline))
            return PipelineStatus(
                workspace,
                pipeline,
                "Undeployed",
                "pipeline is not deployed",
                None,
                (),
                running,
                rates,
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
        running = self._running.get(pipeline_key(workspace, pipeline))
        return PipelineStatus(
            workspace, pipeline, status, details, deployment, engines, running, rates
        )

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
