"""The engine's readiness, as gRPC health statuses and for the Open Inference Protocol.

Ready (SERVING) means: the engine has applied a desired state from the control plane, so it
knows what it is meant to serve, and every pipeline assigned to it has a version active. A
pipeline that is loading or failed to load keeps the engine NOT_SERVING, so a load balancer
or a Kubernetes readiness probe only sends traffic to an engine that can answer it all. An
engine assigned nothing is ready (like Triton with an empty repository): it would otherwise
never become ready, and rollouts would stall. A draining engine (shutting down) is not ready.

Each pipeline also gets its own status, under ``hotswap.pipeline/<workspace>/<pipeline>``:
SERVING while a version of it is active here, NOT_SERVING while assigned but not loaded (or
after it was released); unknown before it was ever assigned here. An engine of a secured
stack (one with a control-plane credential) leaves these out: health needs no token, and
they would tell anyone which workspaces and pipelines it serves.
"""

from __future__ import annotations

from collections.abc import Sequence

from hotswap.engine.host import EngineHost
from hotswap.service.probes import Health

PIPELINE_PREFIX = "hotswap.pipeline/"


def pipeline_service(key: str) -> str:
    """The health service name of pipeline `key` ("<workspace>/<pipeline>")."""
    return PIPELINE_PREFIX + key


def readiness(host: EngineHost) -> tuple[bool, dict[str, bool]]:
    """Whether the engine is ready, and whether each assigned pipeline is, by key."""
    pipelines = {state.key: state.active is not None for state in host.states()}
    return host.synced and not host.draining and all(pipelines.values()), pipelines


class EngineHealth:
    """Keeps the health statuses in step with the host. Level-triggered: every change to the
    host wakes one task that re-reads the whole state, so bursts of changes coalesce and a
    missed one cannot leave a stale status."""

    def __init__(
        self,
        host: EngineHost,
        health: Health,
        services: Sequence[str],
        *,
        per_pipeline: bool = True,
    ) -> None:
        self._per_pipeline = per_pipeline
        self._host = host
        self._health = health
        self._services = ("", *services)
        self._known: set[str] = set()

    async def run_forever(self) -> None:
        while True:
            seen = self._host.changes.count
            await self._apply()
            await self._host.changes.wait_after(seen)

    async def _apply(self) -> None:
        ready, pipelines = readiness(self._host)
        for name in self._services:
            await self._health.set(name, ready)
        if not self._per_pipeline:
            return
        statuses = {pipeline_service(key): up for key, up in pipelines.items()}
        statuses.update({name: False for name in self._known - statuses.keys()})
        for name, up in statuses.items():
            await self._health.set(name, up)
        self._known.update(statuses)
