"""gRPC health checking (``grpc.health.v1.Health``) and server reflection, wired the same way on
the control plane and the engine.

Health follows the gRPC convention: the empty service name is the server as a whole, other
names are services (or, on the engine, pipelines). Everything starts NOT_SERVING; each server
says when it is ready. Reflection lets grpcurl and GUI clients discover every service without
the .proto files. Both stay open when the control plane requires tokens, as probes expect.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

# grpcio-health-checking and grpcio-reflection ship no type information (typeshed has
# types-grpcio-health-checking and types-grpcio-reflection).
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

LIVENESS = "liveness"
"""A service name that is SERVING while the process runs, for liveness probes (readiness
uses the empty name)."""

HEALTH_SERVICE: str = health.SERVICE_NAME
REFLECTION_SERVICE: str = reflection.SERVICE_NAME


class Health:
    """The server's health statuses (a typed front for grpcio-health-checking's servicer)."""

    def __init__(self, servicer: Any) -> None:
        self._servicer = servicer

    async def set(self, service: str, serving: bool) -> None:
        """Sets one status; Watch streams see the change (only when it changes)."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self._servicer.set(service, status)

    async def shutdown(self) -> None:
        """Every status becomes NOT_SERVING for good: call before a graceful stop, so that
        load balancers stop sending requests while in-flight ones finish."""
        await self._servicer.enter_graceful_shutdown()


async def add_probes(server: grpc.aio.Server, services: Sequence[str]) -> Health:
    """Adds Health and reflection to `server` (before it starts). Reflection lists `services`
    plus the two added here. The overall status and each of `services` start NOT_SERVING; the
    `LIVENESS` name starts SERVING."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection([*services, HEALTH_SERVICE, REFLECTION_SERVICE], server)
    probes = Health(servicer)
    for name in ("", *services):
        await probes.set(name, False)
    await probes.set(LIVENESS, True)
    return probes
