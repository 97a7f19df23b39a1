"""Rollouts as the SDK shows them: a record that refreshes itself until it ends."""

from __future__ import annotations

import time
from typing import Any

from hotswap.clients._channels import Channels
from hotswap.clients._errors import HotswapError
from hotswap.clients._render import format_ms, grid_html, grid_text
from hotswap.v1 import control_pb2, types_pb2

# How often wait() asks the control plane.
POLL_SECONDS = 0.5


def traffic_dict(t: types_pb2.ModelTraffic) -> dict[str, Any]:
    mean = t.elapsed_ns / t.rows / 1e6 if t.rows else None
    return {
        "model": t.model,
        "requests": t.requests,
        "rows": t.rows,
        "errors": t.errors,
        "ms_per_row": mean,
    }


def rollout_dict(r: control_pb2.Rollout) -> dict[str, Any]:
    """A rollout as plain data (also `status()["rollout"]`)."""
    return {
        "id": r.id,
        "state": r.state,
        "champion": r.champion.name,
        "challenger": r.challenger.name,
        "baseline_version": r.baseline_version,
        "final_version": r.final_version or None,
        "reason": r.reason,
        "steps": [
            {
                "percent": s.percent,
                "version": s.version,
                "outcome": s.outcome,
                "started": format_ms(s.started_ms),
                "champion": traffic_dict(s.champion),
                "challenger": traffic_dict(s.challenger),
                "reason": s.reason,
            }
            for s in r.steps
        ],
    }


class Rollout:
    """A rollout of a pipeline (:meth:`Pipeline.rollout`): ``state()`` is ``running``,
    ``rolling_back`` (decided, swapping back), then ``completed``, ``rolled_back``,
    ``aborted`` or ``failed``; ``wait()`` blocks until it ends."""

    _HEADERS = ("Step", "Percent", "Version", "Outcome", "Challenger", "Champion", "Why")

    def __init__(self, channels: Channels, proto: control_pb2.Rollout) -> None:
        self._channels = channels
        self._proto = proto

    def refresh(self) -> Rollout:
        self._proto = self._channels.control.get_rollout(
            control_pb2.GetRolloutRequest(
                workspace=self._proto.workspace, pipeline=self._proto.pipeline, id=self._proto.id
            )
        )
        return self

    def state(self) -> str:
        return self._proto.state

    def reason(self) -> str:
        return self._proto.reason

    def final_version(self) -> int:
        """The version it ended on (0 while running)."""
        return self._proto.final_version

    def steps(self) -> list[dict[str, Any]]:
        steps: list[dict[str, Any]] = rollout_dict(self._proto)["steps"]
        return steps

    def to_dict(self) -> dict[str, Any]:
        return rollout_dict(self._proto)

    def wait(self, timeout: float | None = None) -> Rollout:
        """Blocks until the rollout ends; raises HotswapError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.refresh().state() in ("running", "rolling_back"):
            if deadline is not None and time.monotonic() > deadline:
                raise HotswapError(
                    f"rollout {self._proto.id[:8]} still runs after {timeout:g} s (at step "
                    f"{len(self._proto.steps)} of {len(self._proto.percents)}); wait() again "
                    "or abort it with pipeline.abort_rollout()"
                )
            time.sleep(POLL_SECONDS)
        return self

    def _rows(self) -> list[tuple[Any, ...]]:
        def served(t: types_pb2.ModelTraffic) -> str:
            mean = f", {t.elapsed_ns / t.rows / 1e6:.3f} ms/row" if t.rows else ""
            return f"{t.requests} req, {t.errors} err{mean}"

        return [
            (
                i + 1,
                f"{s.percent:g}%",
                s.version,
                s.outcome,
                served(s.challenger),
                served(s.champion),
                s.reason,
            )
            for i, s in enumerate(self._proto.steps)
        ]

    def __repr__(self) -> str:
        r = self._proto
        head = (
            f"rollout {r.id[:8]} of {r.pipeline}: {r.champion.name} -> {r.challenger.name}, "
            f"{r.state}" + (f" ({r.reason})" if r.reason else "")
        )
        return head + "\n" + grid_text(self._HEADERS, self._rows())

    def _repr_html_(self) -> str:
        return grid_html(self._HEADERS, self._rows())
