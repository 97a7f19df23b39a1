"""Live requests/s and latency per pipeline version, from the cumulative counts engines send
in every heartbeat: the difference between two samples of one engine, over the time between
them. Counts that go down (a version loaded again, an engine restarted) start a new baseline
instead of a negative rate.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# Samples closer together than this (a heartbeat sent early for a split model's failure)
# wait for the next one: a few milliseconds of counts make a rate of noise.
MIN_WINDOW = 0.5
# Versions one engine's rates are kept for: far above what an engine holds loaded, so a
# heartbeat that lists more cannot grow the control plane's memory with it.
MAX_VERSIONS = 1024


@dataclass(frozen=True, slots=True)
class VersionCount:
    """What one engine process's loaded version served since it was loaded."""

    workspace: str
    pipeline: str
    version_id: str
    number: int
    requests: int  # failed ones included
    errors: int
    seconds: float  # of the successful requests, summed


@dataclass(frozen=True, slots=True)
class Rate:
    """Per second, over the window between two samples (or summed over engines)."""

    workspace: str
    pipeline: str
    version_id: str
    number: int
    requests: float
    errors: float
    busy: float  # seconds of successful requests per second
    engines: int = 1

    @property
    def mean_latency_ms(self) -> float:
        ok = self.requests - self.errors
        return self.busy / ok * 1000 if ok > 0 else 0.0


class RateMeter:
    """One engine's rates per version, from its heartbeats' counts."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, VersionCount]] = {}
        self.rates: dict[str, Rate] = {}

    def sample(self, at: float, counts: Iterable[VersionCount]) -> None:
        """Takes a heartbeat's counts, measured at `at` seconds (any clock that only moves
        forward between two samples of one engine). Versions it does not list are gone."""
        now = _summed(counts)
        for version_id in set(self._last) - set(now):
            del self._last[version_id]
            self.rates.pop(version_id, None)
        for version_id, count in now.items():
            previous = self._last.get(version_id)
            if previous is None or _went_back(previous, at, count):
                self._last[version_id] = (at, count)
                self.rates.pop(version_id, None)
                continue
            then, before = previous
            window = at - then
            if window < MIN_WINDOW:
                continue
            self._last[version_id] = (at, count)
            self.rates[version_id] = Rate(
                count.workspace,
                count.pipeline,
                version_id,
                count.number,
                (count.requests - before.requests) / window,
                (count.errors - before.errors) / window,
                (count.seconds - before.seconds) / window,
            )


def _went_back(previous: tuple[float, VersionCount], at: float, count: VersionCount) -> bool:
    then, before = previous
    return (
        at < then
        or count.requests < before.requests
        or count.errors < before.errors
        or count.seconds < before.seconds
    )


def _summed(counts: Iterable[VersionCount]) -> dict[str, VersionCount]:
    """The counts by version: an engine with worker processes lists one entry per process."""
    found: dict[str, VersionCount] = {}
    for count in counts:
        known = found.get(count.version_id)
        if known is None and len(found) >= MAX_VERSIONS:
            continue
        found[count.version_id] = (
            count
            if known is None
            else VersionCount(
                count.workspace,
                count.pipeline,
                count.version_id,
                count.number,
                known.requests + count.requests,
                known.errors + count.errors,
                known.seconds + count.seconds,
            )
        )
    return found


def combined(rates: Iterable[Rate]) -> list[Rate]:
    """Rates of several engines summed per version, newest version first."""
    found: dict[str, Rate] = {}
    for rate in rates:
        known = found.get(rate.version_id)
        found[rate.version_id] = (
            rate
            if known is None
            else Rate(
                rate.workspace,
                rate.pipeline,
                rate.version_id,
                rate.number,
                known.requests + rate.requests,
                known.errors + rate.errors,
                known.busy + rate.busy,
                known.engines + rate.engines,
            )
        )
    return sorted(found.values(), key=lambda r: r.number, reverse=True)
