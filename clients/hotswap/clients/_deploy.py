"""Deployment values: the config a deploy asks for, what a swap cost, and the status dict."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from hotswap.clients._errors import HotswapWarning, InvalidInputError
from hotswap.clients._rollout import rollout_dict
from hotswap.v1 import control_pb2


@dataclass(frozen=True, slots=True)
class DeploymentConfig:
    """What :meth:`Pipeline.deploy` asks for. Build one with :class:`DeploymentConfigBuilder`.

    Attributes:
        replicas: Engines to serve the pipeline on; 0 keeps the current count (1 for a first
            deployment).
    """

    replicas: int = 0


def _not_applied(option: str, value: object) -> None:
    warnings.warn(
        f"DeploymentConfigBuilder().{option}({value!r}) is accepted for Wallaroo compatibility "
        "but not applied: hotswap engines get their resources when they start (hotswap engine "
        "--threads/--workers, or the pod's resources on Kubernetes)",
        HotswapWarning,
        stacklevel=3,
    )


class DeploymentConfigBuilder:
    """Builds a :class:`DeploymentConfig` the way Wallaroo's builder does.

    Example:
        >>> DeploymentConfigBuilder().replica_count(2).build()
        DeploymentConfig(replicas=2)
    """

    def __init__(self) -> None:
        self._replicas = 0

    def replica_count(self, count: int) -> DeploymentConfigBuilder:
        """Sets how many engines serve the pipeline (at least 1)."""
        if count < 1:
            raise InvalidInputError(f"replica_count must be at least 1, got {count}")
        self._replicas = count
        return self

    def cpus(self, count: float) -> DeploymentConfigBuilder:
        """Accepted for Wallaroo compatibility, not applied (it warns): an engine's resources
        are set when it starts (``--threads``, ``--workers``, or the pod's limits)."""
        _not_applied("cpus", count)
        return self

    def memory(self, size: str) -> DeploymentConfigBuilder:
        """Accepted for Wallaroo compatibility, not applied (it warns): an engine's memory is
        whatever its process or pod is given."""
        _not_applied("memory", size)
        return self

    def build(self) -> DeploymentConfig:
        """The finished config."""
        return DeploymentConfig(replicas=self._replicas)


@dataclass(frozen=True, slots=True)
class EngineTiming:
    """One engine's part in a swap, as the control plane measured it (milliseconds)."""

    engine: str
    address: str
    prepare_ms: float
    fetch_ms: float
    load_ms: float
    warmup_ms: float
    commit_ms: float
    switch_us: float
    reused: bool
    # The engine's clock when it switched, Unix microseconds (0: it did not report one).
    switched_at_us: int = 0


@dataclass(frozen=True, slots=True)
class DeployResult:
    """What the last :meth:`Pipeline.deploy` did and what it cost.

    Attributes:
        version: The pipeline version number now live.
        version_id: Its id.
        previous: The version number live before (0 when none).
        wall_ms: ``deploy()`` wall time seen by this client, version creation included.
        prepare_ms: The server's prepare phase (fetch, load, warm up on all engines).
        commit_ms: The server's commit phase.
        total_ms: The whole Deploy call inside the control plane.
        engines: Per-engine timings.
        request_id: The ``x-request-id`` the deploy was sent with: the services' log lines
            about this swap carry it.
        unconfirmed: Engines that did not confirm the commit: the deployment is the new
            version, they converge to it on reconnect, and requests avoid them until then.
    """

    version: int
    version_id: str
    previous: int
    wall_ms: float
    prepare_ms: float
    commit_ms: float
    total_ms: float
    engines: tuple[EngineTiming, ...]
    request_id: str = ""
    unconfirmed: tuple[str, ...] = ()

    @property
    def cutover_ms(self) -> float:
        """From the first engine's switch to the last one's, by the engines' clocks: the
        window in which requests to different engines may meet different versions."""
        instants = [e.switched_at_us for e in self.engines if e.switched_at_us]
        return (max(instants) - min(instants)) / 1000 if instants else 0.0

    @classmethod
    def from_proto(
        cls, resp: control_pb2.DeployResponse, wall_ms: float, request_id: str = ""
    ) -> DeployResult:
        return cls(
            version=resp.version.number,
            version_id=resp.version.version_id,
            previous=resp.previous.number if resp.HasField("previous") else 0,
            wall_ms=wall_ms,
            prepare_ms=resp.prepare_ms,
            commit_ms=resp.commit_ms,
            total_ms=resp.total_ms,
            engines=tuple(
                EngineTiming(
                    e.engine,
                    e.address,
                    e.prepare_ms,
                    e.fetch_ms,
                    e.load_ms,
                    e.warmup_ms,
                    e.commit_ms,
                    e.switch_us,
                    e.reused,
                    e.switched_at_us,
                )
                for e in resp.engines
            ),
            request_id=request_id,
            unconfirmed=tuple(resp.unconfirmed_engines),
        )


def status_dict(status: control_pb2.PipelineStatus) -> dict[str, Any]:
    """Shapes a ``PipelineStatus`` like the tutorial's ``pipeline.status()``."""
    pipeline = status.pipeline
    shaped: dict[str, Any] = {
        "status": status.status,
        "details": [status.details] if status.details else [],
        "engines": [_engine_dict(pipeline, e) for e in status.engines],
        # Live traffic per version, newest first (about one heartbeat old).
        "rates": [
            {
                "version": r.number,
                "requests_per_second": r.requests_per_second,
                "errors_per_second": r.errors_per_second,
                "mean_latency_ms": r.mean_latency_ms,
                "engines": r.engines,
            }
            for r in status.rates
        ],
    }
    if status.HasField("swap_in_progress"):
        swap = status.swap_in_progress
        shaped["swap_in_progress"] = {
            "swap_id": swap.swap_id,
            "target_version": swap.target_version,
            "engines": {e.engine: e.stage for e in swap.engines},
        }
    if status.HasField("rollout"):
        shaped["rollout"] = rollout_dict(status.rollout)
    return shaped


def _engine_dict(pipeline: str, engine: control_pb2.EngineStatus) -> dict[str, Any]:
    host = engine.address.rsplit(":", 1)[0].strip("[]") if engine.address else ""
    return {
        "ip": host,
        "address": engine.address,
        "name": engine.name,
        "status": engine.status,
        "reason": engine.reason or None,
        "details": [],
        "pipeline_statuses": {
            "pipelines": [
                {"id": pipeline, "status": engine.status, "version": engine.serving_version}
            ]
        },
        "model_statuses": {
            "models": [
                {"name": m.name, "version": m.version, "sha": m.sha256, "status": m.status}
                for m in engine.models
            ]
        },
    }
