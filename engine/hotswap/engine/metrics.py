"""Prometheus metrics of an engine, in a registry of their own (several engines can run in one
test process). Names are listed in docs/observability.md.

The request path costs a dictionary look-up and a few integer additions: each pipeline
version's counts live in a `Bound`, made on its first request and cached by version id, and a
collector turns them into Prometheus series when scraped. prometheus_client's own metrics take
a lock per update, which cost a 1-row request more than all its counting.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from hotswap.engine.errors import PrepareError
from hotswap.engine.runtime import LoadedPipeline

log = logging.getLogger(__name__)

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


@dataclass(slots=True)
class Bound:
    """The counts of one pipeline version. Only the event loop updates them (the data plane
    counts after its await), so plain integers need no lock; a scrape reads them as they are."""

    labels: tuple[str, str, str]  # workspace, pipeline, version
    ok: int = 0
    rows: int = 0
    latency_sum: float = 0.0
    # Successful requests per latency bucket (not cumulative); the last is +Inf.
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    failures: dict[str, int] = field(default_factory=dict)  # by status code name

    def served(self, seconds: float, rows: int) -> None:
        self.ok += 1
        self.rows += rows
        self.latency_sum += seconds
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1


# A PrepareError's causes, and what link.py counts for anything else.
SWAP_FAILURE_CAUSES = (
    PrepareError.cause,
    *(kind.cause for kind in PrepareError.__subclasses__()),
    "unexpected",
)


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self._bound: dict[str, Bound] = {}
        # Failures of requests no pipeline version was found for (unknown pipeline, bad input).
        self._unbound = Bound(("", "", ""))
        self.in_flight = 0
        # The loopback /metrics addresses of this engine's worker processes, read per scrape.
        self.worker_endpoints: Callable[[], list[str]] = list
        r.register(_RequestCollector(self))
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
        # Every cause from the start, at 0: a dashboard's panel shows "none yet", not no data.
        for cause in SWAP_FAILURE_CAUSES:
            self.swap_failures.labels(cause)

    def bind(self, loaded: LoadedPipeline) -> Bound:
        """The counts of `loaded`'s version (made on its first request)."""
        spec = loaded.spec
        found = self._bound.get(spec.version_id)
        if found is None:
            found = Bound((spec.workspace, spec.pipeline, str(spec.number)))
            self._bound[spec.version_id] = found
            self._forget_old(found.labels[:2])
        return found

    def bound_of(self, version_id: str) -> Bound | None:
        """The counts of a version that has had requests (None before its first)."""
        return self._bound.get(version_id)

    def bounds(self) -> list[Bound]:
        return [*self._bound.values(), self._unbound]

    def forget_except(self, pipelines: set[tuple[str, str]]) -> None:
        """Drops the series of pipelines this engine no longer serves (released ones)."""
        for version_id, bound in list(self._bound.items()):
            if bound.labels[:2] not in pipelines:
                del self._bound[version_id]

    def _forget_old(self, pipeline: tuple[str, str]) -> None:
        versions = [k for k, b in self._bound.items() if b.labels[:2] == pipeline]
        for version_id in versions[:-KEEP_VERSIONS]:
            del self._bound[version_id]

    def failed(self, bound: Bound | None, code: str) -> None:
        """Counts a failed request (`bound` is None when no version was found for it)."""
        counts = (bound or self._unbound).failures
        counts[code] = counts.get(code, 0) + 1

    def watch(
        self,
        loaded: Callable[[], list[LoadedPipeline]],
        cache_bytes: Callable[[], float],
    ) -> None:
        """Gauges read at scrape time."""
        self.sessions_loaded.set_function(lambda: sum(len(p.spec.models()) for p in loaded()))
        self.registry.register(_ModelCollector(loaded))
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


_VERSION_LABELS = ["workspace", "pipeline", "version"]
_BUCKET_BOUNDS = [*(repr(float(b)) for b in LATENCY_BUCKETS), "+Inf"]  # as `le` labels


class _Totals:
    """The request series summed over the processes of one engine, before they become
    metric families: counts by labels, latency buckets (cumulative) and sums."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, ...], float] = defaultdict(float)
        self.rows: dict[tuple[str, ...], float] = defaultdict(float)
        self.buckets: dict[tuple[str, ...], list[float]] = {}
        self.latency_sum: dict[tuple[str, ...], float] = defaultdict(float)
        self.in_flight = 0.0

    def add_bound(self, bound: Bound, unbound: bool) -> None:
        labels = bound.labels
        for code, count in list(bound.failures.items()):
            self.requests[(*labels, code)] += count
        if unbound:
            return
        self.requests[(*labels, "OK")] += bound.ok
        self.rows[labels] += bound.rows
        cumulative = [float(c) for c in itertools.accumulate(list(bound.latency_counts))]
        self._add_buckets(labels, cumulative)
        self.latency_sum[labels] += bound.latency_sum

    def _add_buckets(self, labels: tuple[str, ...], cumulative: list[float]) -> None:
        known = self.buckets.get(labels)
        self.buckets[labels] = (
            cumulative if known is None else [a + b for a, b in zip(known, cumulative, strict=True)]
        )

    def add_text(self, text: str) -> None:
        """Adds the request series of another process's `/metrics` text."""
        buckets: dict[tuple[str, ...], dict[str, float]] = defaultdict(dict)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = tuple(sample.labels.get(k, "") for k in _VERSION_LABELS)
                if sample.name == "hotswap_engine_requests_total":
                    self.requests[(*labels, sample.labels.get("code", ""))] += sample.value
                elif sample.name == "hotswap_engine_rows_total":
                    self.rows[labels] += sample.value
                elif sample.name == "hotswap_engine_request_duration_seconds_bucket":
                    buckets[labels][sample.labels["le"]] = sample.value
                elif sample.name == "hotswap_engine_request_duration_seconds_sum":
                    self.latency_sum[labels] += sample.value
                elif sample.name == "hotswap_engine_requests_in_flight":
                    self.in_flight += sample.value
        for labels, by_bound in buckets.items():
            if set(by_bound) == set(_BUCKET_BOUNDS):
                self._add_buckets(labels, [by_bound[le] for le in _BUCKET_BOUNDS])

    def families(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "hotswap_engine_requests",
            "Inference requests by pipeline version and gRPC status code (OK or the error).",
            labels=[*_VERSION_LABELS, "code"],
        )
        for labels, count in self.requests.items():
            requests.add_metric(list(labels), count)
        latency = HistogramMetricFamily(
            "hotswap_engine_request_duration_seconds",
            "Inference time inside the engine (executor queue included), successful requests.",
            labels=_VERSION_LABELS,
        )
        for labels, cumulative in self.buckets.items():
            buckets = list(zip(_BUCKET_BOUNDS, cumulative, strict=True))
            latency.add_metric(list(labels), buckets, self.latency_sum[labels])
        rows = CounterMetricFamily(
            "hotswap_engine_rows", "Rows inferred by pipeline version.", labels=_VERSION_LABELS
        )
        for labels, count in self.rows.items():
            rows.add_metric(list(labels), count)
        yield requests
        yield latency
        yield rows
        yield GaugeMetricFamily(
            "hotswap_engine_requests_in_flight",
            "Inference requests being served now.",
            self.in_flight,
        )


class _RequestCollector(Collector):
    """The request series, from each version's `Bound` at scrape time, plus those of the
    engine's worker processes (`--processes`): the engine's series count every process."""

    def __init__(self, metrics: EngineMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        totals = _Totals()
        for bound in self._metrics.bounds():
            totals.add_bound(bound, bound is self._metrics._unbound)
        totals.in_flight += self._metrics.in_flight
        for address in self._metrics.worker_endpoints():
            try:
                with urllib.request.urlopen(f"http://{address}/metrics", timeout=2) as answer:
                    totals.add_text(answer.read().decode())
            except (OSError, ValueError) as exc:  # a worker starting or stopping: skip it once
                log.warning("worker metrics at %s not read: %s", address, exc)
        yield from totals.families()


class _ModelCollector(Collector):
    """Per model of each loaded version's split and shadow steps: what it served (the
    numbers a rollout decides on, `LoadedPipeline.traffic`), read at scrape time."""

    _LABELS = ("workspace", "pipeline", "version", "step", "model", "model_version")

    def __init__(self, loaded: Callable[[], list[LoadedPipeline]]) -> None:
        self._loaded = loaded

    def collect(self) -> Iterable[Metric]:
        families = [
            CounterMetricFamily(name, doc, labels=self._LABELS)
            for name, doc in (
                ("hotswap_engine_model_requests", "Requests with rows served by the model."),
                ("hotswap_engine_model_rows", "Rows served by the model."),
                ("hotswap_engine_model_errors", "Requests that failed in the model."),
                ("hotswap_engine_model_seconds", "Time the model's runs took."),
            )
        ]
        for loaded in self._loaded():
            spec = loaded.spec
            for step, _, model, (requests, rows, errors, ns) in loaded.traffic():
                labels = [spec.workspace, spec.pipeline, str(spec.number), str(step),
                          model.model_name, model.model_version]  # fmt: skip
                for family, value in zip(families, (requests, rows, errors, ns / 1e9), strict=True):
                    family.add_metric(labels, value)
        yield from families


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
