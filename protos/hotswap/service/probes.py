"""gRPC health checking (``grpc.health.v1.Health``) and server reflection, wired the same way on
the control plane and the engine.

Health follows the gRPC convention: the empty service name is the server as a whole, other
names are services (or, on the engine, pipelines). Everything starts NOT_SERVING; each server
says when it is ready. Reflection lets grpcurl and GUI clients discover every service without
the .proto files. Both stay open when the control plane requires tokens, as probes expect.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

# grpcio-health-checking and grpcio-reflection ship no type information (typeshed has
# types-grpcio-health-checking and types-grpcio-reflection).
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from hotswap.service.edge import add_servicer, bind, server_options

LIVENESS = "liveness"
"""A service name that is SERVING while the process runs, for liveness probes (readiness
uses the empty name)."""

HEALTH_SERVICE: str = health.SERVICE_NAME
REFLECTION_SERVICE: str = reflection.SERVICE_NAME


# A health request names a service: a few hundred bytes at most.
HEALTH_MESSAGE_BYTES = 4096

# Streams anyone may hold open without a token (health Watch, reflection), per server: they
# must not take the server's whole `maximum_concurrent_rpcs` from callers who have one.
MAX_OPEN_STREAMS = 64


class _OpenStreams:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    async def enter(self, context: Any) -> None:
        if self.active >= self.limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.limit} health/reflection streams are open already: close one, or poll "
                "with Health.Check",
            )
        self.active += 1


class _CappedHealth(health.aio.HealthServicer):
    def __init__(self, streams: _OpenStreams) -> None:
        super().__init__()
        self._streams = streams

    async def Watch(self, request: Any, context: Any) -> None:
        await self._streams.enter(context)
        try:
            await super().Watch(request, context)
        finally:
            self._streams.active -= 1


class _CappedReflection(reflection.aio.ReflectionServicer):
    def __init__(self, names: Sequence[str], streams: _OpenStreams) -> None:
        super().__init__(names)
        self._streams = streams

    async def ServerReflectionInfo(  # type: ignore[override]  # the stub says coroutine
        self, requests: Any, context: Any
    ) -> AsyncIterator[Any]:
        await self._streams.enter(context)
        try:
            parent: Any = super().ServerReflectionInfo(requests, context)
            async for response in parent:
                yield response
        finally:
            self._streams.active -= 1


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

    async def serve_alone(self, listen: str) -> tuple[grpc.aio.Server, int]:
        """Starts a plaintext server on `listen` answering these statuses and nothing else
        (no reflection, no service of the main port): for probes that speak no TLS. Its
        Watch streams count against the same bound as the main port's. Returns the server
        and its port."""
        server = grpc.aio.server(
            options=[
                *server_options(max_message_bytes=HEALTH_MESSAGE_BYTES),
                # Nobody parks a connection here: probes open, ask and go.
                ("grpc.max_connection_idle_ms", 30_000),
                ("grpc.max_connection_age_ms", 120_000),
                ("grpc.max_connection_age_grace_ms", 5_000),
            ],
            maximum_concurrent_rpcs=2 * MAX_OPEN_STREAMS,
        )
        add_servicer(server, health_pb2_grpc.add_HealthServicer_to_server, self._servicer)
        port = bind(server, listen, None)
        await server.start()
        return server, port

    async def shutdown(self) -> None:
        """Every status becomes NOT_SERVING for good: call before a graceful stop, so that
        load balancers stop sending requests while in-flight ones finish."""
        await self._servicer.enter_graceful_shutdown()


async def add_probes(server: grpc.aio.Server, services: Sequence[str]) -> Health:
    """Adds Health and reflection to `server` (before it starts). Reflection lists `services`
    plus the two added here. The overall status and each of `services` start NOT_SERVING; the
    `LIVENESS` name starts SERVING."""
    streams = _OpenStreams(MAX_OPEN_STREAMS)
    servicer = _CappedHealth(streams)
    add_servicer(server, health_pb2_grpc.add_HealthServicer_to_server, servicer)
    names = [*services, HEALTH_SERVICE, REFLECTION_SERVICE]
    add_servicer(
        server,
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server,
        _CappedReflection(names, streams),
    )
    probes = Health(servicer)
    for name in ("", *services):
        await probes.set(name, False)
    await probes.set(LIVENESS, True)
    return probes
