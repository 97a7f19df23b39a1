"""Which engines serve a deployment: pure functions over names, called by the coordinator."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Sequence

from hotswap.control.domain import Deployment


def choose_engines(
    live: Sequence[str], assigned: Collection[str], deployments: Iterable[Deployment], replicas: int
) -> list[str]:
    """`replicas` of the `live` engines: those already serving the pipeline first (no cold
    start), then the least loaded (fewest deployments), by name to break ties."""
    load = Counter(name for d in deployments for name in d.engines)
    ranked = sorted(live, key=lambda name: (name not in assigned, load[name], name))
    return ranked[:replicas]


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
