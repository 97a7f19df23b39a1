"""Prometheus metrics of the control plane, in a registry of their own (several control planes
can run in one test process). Names are listed in docs/observability.md."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Deploys take from milliseconds (a rollback to a retained version) to minutes (big models).
DEPLOY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ControlMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.engines_connected = Gauge(
            "hotswap_control_engines_connected",
            "Engines connected with a current heartbeat.",
            registry=r,
        )
        self.engine_connects = Counter(
            "hotswap_control_engine_connects",
            "Fleet.Connect streams opened by engines.",
            registry=r,
        )
        self.engine_reconnects = Counter(
            "hotswap_control_engine_reconnects",
            "Fleet.Connect streams opened by an engine this control plane had seen before.",
            registry=r,
        )
        self.deploys = Counter(
            "hotswap_control_deploys",
            "Deploys, rollbacks and undeploys by kind and outcome (ok, aborted, rejected).",
            ["kind", "outcome"],
            registry=r,
        )
        self.deploy_seconds = Histogram(
            "hotswap_control_deploy_duration_seconds",
            "Whole Deploy/Undeploy time inside the control plane, by outcome.",
            ["outcome"],
            buckets=DEPLOY_BUCKETS,
            registry=r,
        )
        self.swap_phase_seconds = Histogram(
            "hotswap_control_swap_phase_seconds",
            "Swap phases across all engines: prepare (parallel) and commit (parallel).",
            ["phase"],
            buckets=DEPLOY_BUCKETS,
            registry=r,
        )
        self.engine_stage_seconds = Histogram(
            "hotswap_control_swap_engine_stage_seconds",
            "Per-engine swap stages as engines report them: fetch, build, warmup, prepare "
            "(round trip) and commit (round trip).",
            ["stage"],
            buckets=DEPLOY_BUCKETS,
            registry=r,
        )

    def watch_engines(self, count: Callable[[], int]) -> None:
        """Makes the connected-engines gauge read `count()` at scrape time."""
        self.engines_connected.set_function(count)
