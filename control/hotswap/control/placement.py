"""Which engines serve a deployment: pure functions over engines, called by the coordinator."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Sequence

from hotswap.control.domain import Deployment
from hotswap.control.engine_port import EngineRef

# The labels replicas are spread over, most important first.
HOST, ZONE = "host", "zone"


def choose_engines(
    candidates: Sequence[EngineRef],
    assigned: Collection[str],
    deployments: Iterable[Deployment],
    replicas: int,
) -> list[str]:
    """`replicas` of the `candidates`, one at a time: each on a host no chosen engine is on,
    then in a zone none is in, where labels allow; among equals, those already serving the
    pipeline first (no cold start), then the least loaded (fewest deployments), then by name.
    An engine without a `host` label is a host of its own; one without a `zone` is in none."""
    load = Counter(name for d in deployments for name in d.engines)
    ranked = sorted(candidates, key=lambda e: (e.name not in assigned, load[e.name], e.name))
    hosts: set[str] = set()
    zones: set[str] = set()
    chosen: list[str] = []
    while ranked and len(chosen) < replicas:
        # min keeps the first of equals, so the ranking above breaks ties.
        best = min(
            ranked,
            key=lambda e: (e.labels.get(HOST, e.name) in hosts, e.labels.get(ZONE) in zones),
        )
        ranked.remove(best)
        chosen.append(best.name)
        hosts.add(best.labels.get(HOST, best.name))
        if ZONE in best.labels:
            zones.add(best.labels[ZONE])
    return chosen


def lacking_replicas(
    deployments: Iterable[Deployment],
    live: Collection[str],
    never_seen_counts: bool,
    known: Collection[str],
) -> list[Deployment]:
    """Deployments with fewer live engines than replicas. With `never_seen_counts` (right
    after a control-plane restart), an assigned engine that has not reconnected yet still
    counts: it is still serving, and moving its pipeline would only cause churn."""

    def kept(d: Deployment) -> int:
        return sum(1 for e in d.engines if e in live or (never_seen_counts and e not in known))

    return [d for d in deployments if kept(d) < d.replicas]
