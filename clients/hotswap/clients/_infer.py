"""Sending inference requests to a pipeline's engines: discovery, balancing, batching, retry."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from hotswap.clients._channels import Channels
from hotswap.clients._convert import from_ipc, to_ipc
from hotswap.clients._errors import (
    CancelledError,
    DeploymentError,
    EntityNotFoundError,
    HotswapTimeoutError,
    InferenceTimeoutError,
    UnavailableError,
)
from hotswap.v1 import control_pb2, engine_pb2

DEFAULT_TIMEOUT = 15.0
DEFAULT_BATCH_ROWS = 10_000
ENDPOINTS_TTL = 30.0
# Engines one call tries: the first, then others after UNAVAILABLE or NOT_FOUND.
MAX_ATTEMPTS = 3
# Seconds a retry waits for fresh endpoints before it falls back on the ones it knows.
REFRESH_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class Served:
    """Which pipeline version answered an inference, and where.

    Attributes:
        pipeline_version: The pipeline version number that served the request.
        pipeline_version_id: Its id.
        models: Each step's model as ``{"name", "version", "sha"}``, in order.
        engine: The address of the engine that answered.
        elapsed_ms: Time spent inside the engine.
    """

    pipeline_version: int
    pipeline_version_id: str
    models: tuple[dict[str, str], ...]
    engine: str
    elapsed_ms: float

    @classmethod
    def from_proto(cls, resp: engine_pb2.InferResponse, engine: str) -> Served:
        return cls(
            pipeline_version=resp.pipeline_version,
            pipeline_version_id=resp.pipeline_version_id,
            models=tuple(
                {"name": m.name, "version": m.version, "sha": m.sha256} for m in resp.models
            ),
            engine=engine,
            elapsed_ms=resp.elapsed_ns / 1e6,
        )


class Router:
    """Finds the engines serving one pipeline and spreads requests over them round-robin.

    The address list is cached; it is refreshed after this client deploys or undeploys, every
    ``ENDPOINTS_TTL`` seconds (so replicas added by someone else join in), after a timeout,
    and when an engine answers UNAVAILABLE, NOT_FOUND or CANCELLED (it went away, was cut off,
    stopped serving the pipeline, or stopped mid-call), in which case the request is retried
    on another engine, up to ``MAX_ATTEMPTS`` engines within the call's one timeout.
    """

    def __init__(self, channels: Channels, workspace: str, pipeline: str) -> None:
        self._channels = channels
        self._workspace = workspace
        self._pipeline = pipeline
        self._lock = threading.Lock()
        self._addresses: list[str] | None = None
        self._fetched_at = 0.0
        self._counter = itertools.count()
        self.last_served: Served | None = None

    def invalidate(self) -> None:
        """Forgets the cached engine addresses."""
        with self._lock:
            self._addresses = None

    def addresses(self, *, refresh: bool = False, timeout: float | None = None) -> list[str]:
        """The engines serving the deployed version now (cached unless ``refresh``)."""
        with self._lock:
            fresh = time.monotonic() - self._fetched_at < ENDPOINTS_TTL
            if self._addresses is not None and fresh and not refresh:
                return self._addresses
        resp = self._channels.control.get_pipeline_endpoints(
            control_pb2.GetPipelineEndpointsRequest(
                workspace=self._workspace, pipeline=self._pipeline
            ),
            timeout=timeout,
        )
        addresses = list(resp.addresses)
        with self._lock:
            self._addresses = addresses
            self._fetched_at = time.monotonic()
        return addresses

    def infer_table(
        self,
        table: pa.Table,
        *,
        timeout: float | None,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        exclude: tuple[str, ...] = (),
    ) -> pa.Table:
        """Sends ``table`` in batches of at most ``batch_rows`` rows and joins the answers,
        which leave out the column groups in ``exclude`` ("in", "time", ...).

        The result's schema metadata is the last batch's (the version that served it).
        """
        timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        if table.num_rows <= batch_rows:
            return self._infer_one(table, timeout, exclude)
        parts = [
            self._infer_one(table.slice(start, batch_rows), timeout, exclude)
            for start in range(0, table.num_rows, batch_rows)
        ]
        metadata = parts[-1].schema.metadata
        joined = pa.concat_tables([p.replace_schema_metadata(None) for p in parts])
        return joined.replace_schema_metadata(metadata)

    def _infer_one(self, table: pa.Table, timeout: float, exclude: tuple[str, ...]) -> pa.Table:
        request = engine_pb2.InferRequest(
            workspace=self._workspace,
            pipeline=self._pipeline,
            arrow=to_ipc(table),
            dataset_exclude=exclude,
        )
        deadline = time.monotonic() + timeout
        addresses = self.addresses()
        if not addresses:
            addresses = self.addresses(refresh=True)
        address = self._pick(addresses)
        failed: set[str] = set()
        for attempt in range(1, MAX_ATTEMPTS + 1):
            left = deadline - time.monotonic()
            try:
                resp = self._send(address, request, left, timeout)
                break
            except InferenceTimeoutError:
                self.invalidate()  # the engine may be gone: the next call asks again
                raise
            except (UnavailableError, EntityNotFoundError, CancelledError):
                # The engine went away, is cut off (keepalive said so), moved on, or stopped
                # while the call was in flight (the SDK never cancels its own calls): ask the
                # control plane again and retry on another engine while time is left.
                # Inference is a pure function of its input, so a retry is safe; the
                # inference log may then hold the request twice.
                failed.add(address)
                if attempt == MAX_ATTEMPTS or deadline - time.monotonic() <= 0:
                    raise
                addresses = self._refreshed(addresses, deadline)
                address = self._pick([a for a in addresses if a not in failed] or addresses)
        self.last_served = Served.from_proto(resp, address)
        return from_ipc(resp.arrow)

    def _refreshed(self, known: list[str], deadline: float) -> list[str]:
        """The endpoints asked again within the call's time left; the ones known already when
        the control plane cannot answer in time (engines keep serving while it is away)."""
        left = min(deadline - time.monotonic(), REFRESH_TIMEOUT)
        try:
            return self.addresses(refresh=True, timeout=max(left, 0.001))
        except (UnavailableError, HotswapTimeoutError):
            return known

    def _pick(self, addresses: list[str]) -> str:
        if not addresses:
            # Also reached while handling an engine's error: the answer replaces it.
            raise self._not_serving() from None
        return addresses[next(self._counter) % len(addresses)]

    def _send(
        self, address: str, request: engine_pb2.InferRequest, left: float, timeout: float
    ) -> engine_pb2.InferResponse:
        """One attempt with `left` seconds of the call's `timeout`."""
        try:
            return self._channels.infer_stub(address)(request, timeout=max(left, 0.001))
        except HotswapTimeoutError:
            raise InferenceTimeoutError(
                f"inference on pipeline {self._pipeline!r} did not finish within {timeout:g} s "
                f"(engine {address}). Pass a larger timeout, e.g. infer(data, timeout="
                f"{max(2 * timeout, 30):g}); send fewer rows per call; or serve on more engines "
                "with deploy(deployment_config=DeploymentConfigBuilder().replica_count(2).build())."
            ) from None
        except (UnavailableError, EntityNotFoundError, CancelledError) as err:
            # Name the engine, once (a connect failure already names it).
            message = err.message if address in err.message else f"engine {address}: {err.message}"
            raise type(err)(message) from None

    def _not_serving(self) -> Exception:
        pipeline = self._channels.control.get_pipeline(
            control_pb2.GetPipelineRequest(workspace=self._workspace, name=self._pipeline)
        )
        if not pipeline.HasField("deployed"):
            return DeploymentError(
                f"pipeline {self._pipeline!r} is not deployed: call pipeline.deploy() first"
            )
        return UnavailableError(
            f"pipeline {self._pipeline!r} is deployed (version {pipeline.deployed.number}) but no "
            "engine serves it right now: see pipeline.status()"
        )


def served_attrs(served: Served | None) -> dict[str, Any]:
    """``DataFrame.attrs`` entries for a response (used when the schema carries none)."""
    if served is None:
        return {}
    return {
        "hotswap.pipeline_version": served.pipeline_version,
        "hotswap.pipeline_version_id": served.pipeline_version_id,
        "hotswap.models": [dict(m) for m in served.models],
    }
