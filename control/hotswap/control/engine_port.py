"""What the swap coordinator needs from the engines, with no transport in sight.

`EnginePort` is implemented by `fleet.Fleet` over the Fleet gRPC streams; tests implement it
with plain Python engines. Everything crossing it is a frozen dataclass or a domain value.

    EngineGone          the engine's stream is closed (or closes while we wait)
    EngineRefusedSwap   the engine answered, but could not prepare or commit (its reason)
    TimeoutError        no answer within the timeout
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from hotswap.control.domain import PipelineVersion


class EngineGone(Exception):
    """The engine's stream closed while the control plane waited for its answer."""


class EngineRefusedSwap(Exception):
    """The engine answered that it could not prepare (or commit); the message is its reason."""


@dataclass(frozen=True, slots=True)
class EngineRef:
    name: str
    address: str
    # Placement labels (`host`, `zone`, ...) as the engine announced them.
    labels: Mapping[str, str] = field(default_factory=dict)
    # Shutting down: it serves what it has until its replicas moved, and gets no new ones.
    draining: bool = False


@dataclass(frozen=True, slots=True)
class PrepareDone:
    """An engine's answer to prepare: the version is built, checked and warmed up."""

    fetch_ms: float
    load_ms: float
    warmup_ms: float
    reused: bool


@dataclass(frozen=True, slots=True)
class CommitDone:
    """An engine's answer to commit: the prepared version serves now."""

    switch_us: float
    # The engine's wall-clock instant of the switch, Unix microseconds (0: not reported).
    switched_at_us: int = 0
    # When the Commit message reached the engine, Unix microseconds (0: not reported).
    received_at_us: int = 0


class EnginePort(Protocol):
    lost_after: float

    def live(self) -> list[EngineRef]:
        """Connected engines whose heartbeats are current (draining ones too), by name."""
        ...

    def known(self, name: str) -> bool:
        """Whether `name` has connected since the control plane started."""
        ...

    def address_of(self, name: str) -> str:
        """The address `name` last announced ("" if it never connected)."""
        ...

    async def prepare(
        self, engine: str, swap_id: str, version: PipelineVersion, request_id: str, timeout: float
    ) -> PrepareDone: ...

    async def commit(
        self, engine: str, swap_id: str, request_id: str, timeout: float, switch_at_us: int = 0
    ) -> CommitDone:
        """Phase 2; the engine switches at `switch_at_us` (Unix µs, 0: at once)."""
        ...

    def abort(self, engine: str, swap_id: str, reason: str, request_id: str) -> None:
        """Tells `engine` to drop what it prepared for `swap_id` (no answer expected)."""
        ...

    def push_desired(
        self,
        engine: str,
        versions: Sequence[PipelineVersion],
        revision: int,
        unless_served: bool = False,
    ) -> None:
        """Sends `engine` everything it must serve now, numbered `revision` (no-op if gone).
        With `unless_served`, nothing is sent when the engine reports it runs exactly that
        already (its revision then stays where it was)."""
        ...

    def drained(self, engine: str, kept: Sequence[str]) -> None:
        """Tells a draining `engine` that its replicas moved, but for the pipelines `kept`."""
        ...

    async def wait_applied(self, engine: str, revision: int, timeout: float) -> bool:
        """True once `engine` reports it applied `revision` (or a later one); False if it
        disconnects or `timeout` passes first."""
        ...
