"""Prometheus metrics of an engine, in a registry of their own (several engines can run in one
test process). Names are listed in docs/observability.md.

The request path costs a dictionary look-up and a few lock-protected additions: the label
children of each pipeline version are bound once (`bind`) and cached by version id.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hotswap.engine.runtime import LoadedPipeline

# 1-row requests take ~0.1-1 ms; 1,000-row batches a few ms; large batches seconds.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)
SWAP_BUCKETS = (1e-6, 1e-5, 1e-4, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


# Series kept per pipeline: a version's label children go once this many newer ones have
# served, so a long run of swaps cannot grow the registry (or the scrape) without bound.
KEEP_VERSIONS = 8


@dataclass(frozen=True, slots=True)
class Bound:
    """The label children of one pipeline version: what a request touches."""

    ok: Counter
    latency: Histogram
    rows: Counter
    labels: tuple[str, str, str]  # workspace, pipeline, version
    codes: set[str] = field(default_factory=set)  # error codes counted for this version


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        version = ["workspace", "pipeline", "version"]
        self.requests = Counter(
            "hotswap_engine_requests",
            "Inference requests by pipeline version and gRPC status code (OK or the error).",
            [*version, "code"],
            registry=r,
        )
        self.latency = Histogram(
            "hotswap_engine_request_duration_seconds",
            "Inference time inside the engine (executor queue included), successful requests.",
            version,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rows = Counter(
            "hotswap_engine_rows", "Rows inferred by pipeline version.", version, registry=r
        )
        self.in_flight = Gauge(
            "hotswap_engine_requests_in_flight", "Inference requests being served now.", registry=r
        )
        self.sessions_loaded = Gauge(
            "hotswap_engine_sessions_loaded",
            "ONNX Runtime sessions held: active, prepared and retained versions.",
            registry=r,
        )
        self.versions_loaded = Gauge(
            "hotswap_engine_versions_loaded",
            "Pipeline versions held in memory (active, prepared and retained).",
            registry=r,
        )
        self.blob_cache_bytes = Gauge(
            "hotswap_engine_blob_cache_bytes", "Bytes of model blobs cached on disk.", registry=r
        )
        self.swap_stage_seconds = Histogram(
            "hotswap_engine_swap_stage_seconds",
            "Swap stages on this engine: fetch, build, warmup (prepare), commit (the reference "
            "switch), release (commit until the old version's sessions were freed).",
            ["stage"],
            buckets=SWAP_BUCKETS,
            registry=r,
        )
        self.swaps = Counter(
            "hotswap_engine_swaps",
            "Swap steps by result: prepared, reused, committed, aborted.",
            ["result"],
            registry=r,
        )
        self.swap_failures = Counter(
            "hotswap_engine_swap_failures",
            "Failed prepares and commits by cause: fetch, build, warmup, not_prepared, unexpected.",
            ["cause"],
            registry=r,
        )
        self._bound: dict[str, Bound] = {}

    def bind(self, loaded: LoadedPipeline) -> Bound:
        """The cached label children of `loaded`'s version (made on its first request)."""
        spec = loaded.spec
        found = self._bound.get(spec.version_id)
        if found is None:
            labels = (spec.workspace, spec.pipeline, str(spec.number))
            found = Bound(
                self.requests.labels(*labels, "OK"),
                self.latency.labels(*labels),
                self.rows.labels(*labels),
                labels,
            )
            self._bound[spec.version_id] = found
            self._forget_old(labels[:2])
        return found

    def forget_except(self, pipelines: set[tuple[str, str]]) -> None:
        """Drops the series of pipelines this engine no longer serves (released ones)."""
        for version_id, bound in list(self._bound.items()):
            if bound.labels[:2] not in pipelines:
                self._remove(self._bound.pop(version_id))

    def _remove(self, old: Bound) -> None:
        for code in {"OK", *old.codes}:
            self.requests.remove(*old.labels, code)
        self.latency.remove(*old.labels)
        self.rows.remove(*old.labels)

    def _forget_old(self, pipeline: tuple[str, str]) -> None:
        versions = [k for k, b in self._bound.items() if b.labels[:2] == pipeline]
        for version_id in versions[:-KEEP_VERSIONS]:
            self._remove(self._bound.pop(version_id))

    def failed(self, bound: Bound | None, code: str) -> None:
        """Counts a failed request (`bound` is None when no version was found for it)."""
        labels = bound.labels if bound is not None else ("", "", "")
        if bound is not None:
            bound.codes.add(code)
        self.requests.labels(*labels, code).inc()

    def watch(
        self,
        loaded: Callable[[], list[LoadedPipeline]],
        cache_bytes: Callable[[], float],
    ) -> None:
        """Gauges read at scrape time."""
        self.sessions_loaded.set_function(lambda: sum(len(p.spec.steps) for p in loaded()))
        self.versions_loaded.set_function(lambda: len(loaded()))
        self.blob_cache_bytes.set_function(cache_bytes)

    def watch_log(
        self,
        rows: Callable[[], float],
        dropped: Callable[[], float],
        memory_bytes: Callable[[], float],
        disk_bytes: Callable[[], float],
    ) -> None:
        """Exposes the inference log's own counts, read at scrape time."""
        self.registry.register(_LogCollector(rows, dropped, memory_bytes, disk_bytes))

    def swap_failed(self, cause: str) -> None:
        """Counts a failed prepare or commit by its cause (`PrepareError.cause`)."""
        self.swap_failures.labels(cause).inc()

    def released_after(self, committed_at: float) -> Callable[[], None]:
        """A callback for when an old version is freed: observes the release stage."""

        def observe() -> None:
            self.swap_stage_seconds.labels("release").observe(time.monotonic() - committed_at)

        return observe


class _LogCollector(Collector):
    def __init__(self, *readers: Callable[[], float]) -> None:
        self._readers = readers

    def collect(self) -> Iterable[Metric]:
        rows, dropped, memory, disk = (read() for read in self._readers)
        yield CounterMetricFamily(
            "hotswap_engine_inference_log_rows", "Rows appended to the inference log.", rows
        )
        yield CounterMetricFamily(
            "hotswap_engine_inference_log_dropped_rows",
            "Inference log rows dropped (memory ring full or disk cap reached).",
            dropped,
        )
        yield GaugeMetricFamily(
            "hotswap_engine_inference_log_memory_bytes",
            "Bytes of inference log waiting in memory to be written.",
            memory,
        )
        yield GaugeMetricFamily(
            "hotswap_engine_inference_log_disk_bytes", "Bytes of inference log files.", disk
        )
