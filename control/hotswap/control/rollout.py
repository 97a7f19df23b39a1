"""Rollouts that decide for themselves: traffic moves to a new model by hot swaps, step by
step, and goes back at once when the new model breaks a limit.

Each step is a pipeline version whose step `step` is a random split of the deployed model (the
champion) and the new one (the challenger), deployed like any version. Engines count what
each model of a split serves (`ModelTraffic`, in their heartbeats); the watcher sums a step's
counts over the engines every `poll` seconds and decides:

- the challenger broke a limit (error rate, or mean time per row against the champion's):
  roll back, a hot swap to the version deployed before the rollout;
- the step's time is up and the challenger served `min_requests`: the next step;
- after the last step (100%), a version with the challenger alone is live: completed.

Every swap a rollout makes carries a note (the swap timeline's `note`) with the numbers that
decided it. The record is saved in the store at every change, so a restarted control plane
resumes a running rollout where it was, or, when the pipeline no longer serves the rollout's
version, ends it without touching what serves: never half-done and forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hotswap.control.coordinator import SwapCoordinator
from hotswap.control.domain import PipelineVersion, pipeline_key
from hotswap.control.errors import (
    ControlError,
    DeployConflict,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from hotswap.control.splits import SplitRequest
from hotswap.control.store import Store, now_ms
from hotswap.v1 import types_pb2

log = logging.getLogger(__name__)

DEFAULT_PERCENTS = (5.0, 25.0, 50.0, 100.0)
DEFAULT_STEP_SECONDS = 60.0
DEFAULT_MAX_ERROR_RATE = 0.01
DEFAULT_MAX_LATENCY_RATIO = 1.5
DEFAULT_MIN_REQUESTS = 20
# How often the watcher reads the engines' counts (they report every heartbeat).
POLL_SECONDS = 0.5
# A rollback that cannot be deployed (no engine connected yet) is retried this long.
ROLLBACK_PATIENCE = 120.0
MAX_STEPS = 20


@dataclass(slots=True)
class Served:
    """One model's counts in a rollout step, summed over the engines."""

    requests: int = 0
    rows: int = 0
    errors: int = 0
    elapsed_ns: int = 0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def ms_per_row(self) -> float:
        return self.elapsed_ns / self.rows / 1e6 if self.rows else 0.0


@dataclass(slots=True)
class RolloutStep:
    percent: float
    version: int
    started_ms: int
    ended_ms: int = 0
    outcome: str = "running"  # running | passed | failed | stopped
    champion: Served = field(default_factory=Served)
    challenger: Served = field(default_factory=Served)
    reason: str = ""


@dataclass(slots=True)
class Rollout:
    id: str
    workspace: str
    pipeline: str
    step: int
    champion: dict[str, str]  # {"name", "version"}: the model version
    challenger: dict[str, str]
    baseline_version: int
    percents: tuple[float, ...]
    step_seconds: float
    max_error_rate: float
    max_latency_ratio: float
    min_requests: int
    requested_by: str = ""
    state: str = "running"  # running | completed | rolled_back | aborted | failed
    final_version: int = 0
    steps: list[RolloutStep] = field(default_factory=list)
    reason: str = ""
    started_ms: int = field(default_factory=now_ms)
    ended_ms: int = 0

    @property
    def key(self) -> str:
        return pipeline_key(self.workspace, self.pipeline)

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Rollout:
        steps = [
            RolloutStep(
                **{
                    **s,
                    "champion": Served(**s["champion"]),
                    "challenger": Served(**s["challenger"]),
                }
            )
            for s in record["steps"]
        ]
        return cls(**{**record, "percents": tuple(record["percents"]), "steps": steps})


def check_percents(percents: Sequence[float]) -> tuple[float, ...]:
    """The step shares, checked: increasing, above 0, ending at 100."""
    shares = tuple(float(p) for p in percents) or DEFAULT_PERCENTS
    if len(shares) > MAX_STEPS:
        raise InvalidArgument(f"a rollout has at most {MAX_STEPS} steps, not {len(shares)}")
    if any(not math.isfinite(p) or not 0 < p <= 100 for p in shares):
        raise InvalidArgument(
            f"rollout steps {list(shares)}: each is a percent above 0, at most 100"
        )
    if any(b <= a for a, b in itertools.pairwise(shares)) or shares[-1] != 100:
        raise InvalidArgument(
            f"rollout steps {list(shares)} must increase and end at 100 (e.g. 5, 25, 50, 100)"
        )
    return shares


def judge(rollout: Rollout, step: RolloutStep) -> str:
    """The limit the challenger broke in `step`, in words ("" when it holds them)."""
    challenger, champion = step.challenger, step.champion
    if challenger.errors and challenger.error_rate > rollout.max_error_rate:
        return (
            f"challenger error rate {challenger.error_rate:.1%} ({challenger.errors} of "
            f"{challenger.requests} requests) > {rollout.max_error_rate:.1%}"
        )
    ratio = latency_ratio(rollout, step)
    if ratio is not None and ratio > rollout.max_latency_ratio:
        return (
            f"challenger {challenger.ms_per_row:.4f} ms a row = {ratio:.2f}x the champion's "
            f"{champion.ms_per_row:.4f} ms > {rollout.max_latency_ratio:.2f}x"
        )
    return ""


def latency_ratio(rollout: Rollout, step: RolloutStep) -> float | None:
    """Challenger's mean time per row over the champion's, once both served enough."""
    enough = rollout.min_requests
    if step.challenger.requests < enough or step.champion.requests < enough:
        return None
    if not step.champion.elapsed_ns:
        return None
    return step.challenger.ms_per_row / step.champion.ms_per_row


def summary(rollout: Rollout, step: RolloutStep) -> str:
    """A step's numbers in words, for the timeline and the record."""
    c = step.challenger
    text = (
        f"challenger {c.errors} errors in {c.requests} requests ({c.error_rate:.2%} <= "
        f"{rollout.max_error_rate:.2%})"
    )
    ratio = latency_ratio(rollout, step)
    if ratio is not None:
        text += f", {ratio:.2f}x the champion's time a row (<= {rollout.max_latency_ratio:.2f}x)"
    return text


class Rollouts:
    """Starts, watches, resumes and aborts rollouts; one running per pipeline."""

    def __init__(
        self,
        store: Store,
        coordinator: SwapCoordinator,
        traffic: Callable[[str], list[types_pb2.ModelTraffic]],
        *,
        poll: float = POLL_SECONDS,
    ) -> None:
        self._store = store
        self._coordinator = coordinator
        self._traffic = traffic
        self._poll = poll
        self._running: dict[str, Rollout] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stop: dict[str, asyncio.Event] = {}
        self._starting: set[str] = set()

    # -- the API ----------------------------------------------------------------------------

    def running(self, workspace: str, pipeline: str) -> Rollout | None:
        return self._running.get(pipeline_key(workspace, pipeline))

    def latest(self, workspace: str, pipeline: str) -> Rollout:
        live = self.running(workspace, pipeline)
        if live is not None:
            return live
        self._store.get_pipeline(workspace, pipeline)  # NOT_FOUND for an unknown pipeline
        found = self._store.rollouts(workspace, pipeline)
        if not found:
            raise NotFound(f"pipeline {pipeline!r} has had no rollout")
        return Rollout.from_record(found[0])

    async def start(
        self,
        workspace: str,
        pipeline: str,
        model: str,
        model_version: str,
        *,
        step: int = 0,
        percents: Sequence[float] = (),
        step_seconds: float = 0.0,
        max_error_rate: float | None = None,
        max_latency_ratio: float = 0.0,
        min_requests: int = 0,
        requested_by: str = "",
    ) -> Rollout:
        """Deploys the first step and returns with the watcher running."""
        key = pipeline_key(workspace, pipeline)
        if key in self._running or key in self._starting:
            raise FailedPrecondition(
                f"a rollout of pipeline {pipeline!r} is running: wait for it, or abort it"
            )
        shares = check_percents(percents)
        error_rate = DEFAULT_MAX_ERROR_RATE if max_error_rate is None else max_error_rate
        latency = max_latency_ratio or DEFAULT_MAX_LATENCY_RATIO
        seconds = step_seconds or DEFAULT_STEP_SECONDS
        if not (
            0 <= error_rate <= 1 and latency > 0 and 0 < seconds <= 86_400 and min_requests >= 0
        ):
            raise InvalidArgument(
                "max_error_rate is a fraction 0-1, max_latency_ratio above 0, step_seconds "
                "above 0 (at most a day), min_requests 0 or more"
            )
        deployment = self._store.get_pipeline(workspace, pipeline).deployment
        if deployment is None:
            raise FailedPrecondition(
                f"pipeline {pipeline!r} is not deployed: a rollout starts from a deployed "
                "version (deploy one first)"
            )
        baseline = deployment.version
        if not 0 <= step < len(baseline.steps):
            raise InvalidArgument(
                f"pipeline {pipeline!r} version {baseline.number} has {len(baseline.steps)} "
                f"step(s); no step {step} (steps count from 0)"
            )
        if any(s.step == step for s in baseline.splits):
            raise FailedPrecondition(
                f"step {step} of version {baseline.number} is already a split: deploy a version "
                "with one model there, then roll out"
            )
        champion = baseline.steps[step]
        challenger = self._store.resolve_model_version(workspace, model, model_version)
        if challenger.name == champion.name:
            raise InvalidArgument(
                f"the challenger is model {model!r}, the step's own model: a rollout moves "
                "traffic to another model (upload the new one under its own name)"
            )
        rollout = Rollout(
            str(uuid.uuid4()),
            workspace,
            pipeline,
            step,
            {"name": champion.name, "version": champion.version},
            {"name": challenger.name, "version": challenger.version},
            baseline.number,
            shares,
            seconds,
            error_rate,
            latency,
            min_requests or DEFAULT_MIN_REQUESTS,
            requested_by,
        )
        self._starting.add(key)
        try:
            self._save(rollout)
            note = (
                f"{self._name(rollout)}: step 1 of {len(shares)}, {shares[0]:g}% to "
                f"{challenger.name}"
            )
            try:
                await self._deploy_step(rollout, 0, baseline.number, note)
            except ControlError as exc:
                self._end(rollout, "failed", f"the first step could not be deployed: {exc}")
                raise
            self._watch(rollout)
        finally:
            self._starting.discard(key)
        return rollout

    async def abort(self, workspace: str, pipeline: str, reason: str = "") -> Rollout:
        """Stops the running rollout and swaps back to its baseline."""
        rollout = self.running(workspace, pipeline)
        if rollout is None:
            raise FailedPrecondition(f"no rollout of pipeline {pipeline!r} is running")
        why = f"aborted: {reason.strip()[:200] or 'AbortRollout'}"
        self._stop[rollout.key].set()
        task = self._tasks.get(rollout.key)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._roll_back(rollout, "aborted", why)
        return rollout

    def resume(self) -> None:
        """At start: watch each rollout the store says is running, if its version still
        serves; else it ends as stopped, and what serves is left as it is."""
        for record in self._store.rollouts(state="running"):
            rollout = Rollout.from_record(record)
            deployment = self._store.get_pipeline(rollout.workspace, rollout.pipeline).deployment
            current = rollout.steps[-1] if rollout.steps else None
            if (
                current is None
                or deployment is None
                or deployment.version.number != current.version
            ):
                serving = deployment.version.number if deployment else 0
                self._end(
                    rollout,
                    "aborted",
                    "the control plane restarted and the pipeline "
                    f"serves version {serving}, not the rollout's: left as it is",
                )
                continue
            log.info("resuming rollout %s of %s at %g%%", rollout.id, rollout.key, current.percent)
            self._watch(rollout)

    async def close(self) -> None:
        """Stops watching (a control plane stopping): the records stay running, to resume."""
        for task in list(self._tasks.values()):
            task.cancel()
        for task in list(self._tasks.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- the watcher ----------------------------------------------------------------------

    def _watch(self, rollout: Rollout) -> None:
        self._running[rollout.key] = rollout
        self._stop[rollout.key] = asyncio.Event()
        self._tasks[rollout.key] = asyncio.get_running_loop().create_task(
            self._watch_forever(rollout), name=f"rollout {rollout.id}"
        )

    async def _watch_forever(self, rollout: Rollout) -> None:
        try:
            while rollout.state == "running":
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop[rollout.key].wait(), self._poll)
                    return  # aborted: `abort` rolls back
                await self._decide(rollout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not leave traffic split with no one watching
            log.exception("rollout %s failed", rollout.id)
            await self._roll_back(rollout, "failed", f"the rollout stopped on an error: {exc}")
        finally:
            if self._tasks.get(rollout.key) is asyncio.current_task():
                self._tasks.pop(rollout.key, None)

    async def _decide(self, rollout: Rollout) -> None:
        step = rollout.steps[-1]
        index = len(rollout.steps) - 1
        if step.percent >= 100:
            step.outcome, step.ended_ms = "passed", now_ms()
            rollout.final_version = step.version
            self._end(rollout, "completed", f"{rollout.challenger['name']} serves alone")
            return
        self._count(rollout, step)
        broken = judge(rollout, step)
        if broken:
            step.outcome, step.reason, step.ended_ms = "failed", broken, now_ms()
            await self._roll_back(
                rollout, "rolled_back", f"step {index + 1} ({step.percent:g}%): {broken}"
            )
            return
        elapsed = (now_ms() - step.started_ms) / 1000
        if elapsed < rollout.step_seconds or step.challenger.requests < rollout.min_requests:
            self._save(rollout)  # the numbers so far, for status()
            return
        step.outcome, step.reason, step.ended_ms = "passed", summary(rollout, step), now_ms()
        nxt = rollout.percents[index + 1]
        what = (
            f"{rollout.challenger['name']} alone"
            if nxt >= 100
            else f"{nxt:g}% to {rollout.challenger['name']}"
        )
        note = (
            f"{self._name(rollout)}: step {index + 2} of {len(rollout.percents)}, {what} "
            f"(step {index + 1} at {step.percent:g}% passed: {step.reason})"
        )
        try:
            await self._deploy_step(rollout, index + 1, step.version, note)
        except DeployConflict as exc:
            self._end(rollout, "aborted", f"someone else deployed the pipeline: {exc}")
        except ControlError as exc:
            await self._roll_back(
                rollout, "failed", f"step {index + 2} could not be deployed: {exc}"
            )

    def _count(self, rollout: Rollout, step: RolloutStep) -> None:
        version = self._store.pipeline_version(rollout.workspace, rollout.pipeline, step.version)
        champion, challenger = Served(), Served()
        for t in self._traffic(version.version_id):
            if t.step != rollout.step:
                continue
            into = champion if t.arm == 0 else challenger
            into.requests += t.requests
            into.rows += t.rows
            into.errors += t.errors
            into.elapsed_ns += t.elapsed_ns
        step.champion, step.challenger = champion, challenger

    # -- swaps ------------------------------------------------------------------------------

    async def _deploy_step(self, rollout: Rollout, index: int, current: int, note: str) -> None:
        version = self._step_version(rollout, rollout.percents[index])
        rollout.steps.append(RolloutStep(rollout.percents[index], version.number, now_ms()))
        self._save(rollout)
        try:
            await self._coordinator.deploy(
                rollout.workspace,
                rollout.pipeline,
                version.number,
                0,
                current,
                requested_by=self._who(rollout),
                note=note,
            )
        except ControlError as exc:
            rollout.steps[-1].outcome, rollout.steps[-1].reason = "stopped", str(exc)
            rollout.steps[-1].ended_ms = now_ms()
            self._save(rollout)
            raise
        log.info("%s", note)

    def _step_version(self, rollout: Rollout, percent: float) -> PipelineVersion:
        """The version of a step: the baseline with its step split (or, at 100%, the
        challenger alone)."""
        baseline = self._store.pipeline_version(
            rollout.workspace, rollout.pipeline, rollout.baseline_version
        )
        steps = [(m.name, m.version) for m in baseline.steps]
        challenger = (rollout.challenger["name"], rollout.challenger["version"])
        splits = [
            SplitRequest(
                s.step,
                s.kind,
                tuple((m.name, m.version) for m in s.models),
                s.weights,
                s.key,
                s.key_values,
            )
            for s in baseline.splits
        ]
        if percent >= 100:
            steps[rollout.step] = challenger
        else:
            champion = (rollout.champion["name"], rollout.champion["version"])
            splits.append(
                SplitRequest(
                    rollout.step, "random", (champion, challenger), (100 - percent, percent)
                )
            )
        return self._store.create_pipeline_version(
            rollout.workspace, rollout.pipeline, steps, splits
        )

    async def _roll_back(self, rollout: Rollout, state: str, reason: str) -> None:
        """A hot swap to the baseline, retried while no engine can take it."""
        if rollout.steps and rollout.steps[-1].outcome == "running":
            rollout.steps[-1].outcome, rollout.steps[-1].ended_ms = "stopped", now_ms()
        note = f"{self._name(rollout)}: rolled back to version {rollout.baseline_version}: {reason}"
        deadline = time.monotonic() + ROLLBACK_PATIENCE
        while True:
            current = self._store.get_pipeline(rollout.workspace, rollout.pipeline).deployment
            ours = {s.version for s in rollout.steps}
            if current is None or current.version.number not in ours:
                reason += " (the pipeline was deployed by someone else meanwhile: left as it is)"
                break
            try:
                await self._coordinator.deploy(
                    rollout.workspace,
                    rollout.pipeline,
                    rollout.baseline_version,
                    0,
                    current.version.number,
                    requested_by=self._who(rollout),
                    note=note,
                )
                break
            except DeployConflict:
                continue  # someone deployed between the read and the swap: look again
            except ControlError as exc:
                if time.monotonic() > deadline:
                    state, reason = "failed", f"{reason}; the rollback failed: {exc}"
                    log.error(
                        "rollout %s: rollback to v%d failed: %s",
                        rollout.id,
                        rollout.baseline_version,
                        exc,
                    )
                    break
                await asyncio.sleep(1.0)
        rollout.final_version = rollout.baseline_version
        log.warning("%s", note)
        self._end(rollout, state, reason)

    def _end(self, rollout: Rollout, state: str, reason: str) -> None:
        rollout.state, rollout.reason, rollout.ended_ms = state, reason, now_ms()
        if not rollout.final_version and rollout.steps and state == "completed":
            rollout.final_version = rollout.steps[-1].version
        self._save(rollout)
        self._running.pop(rollout.key, None)
        self._stop.pop(rollout.key, None)

    def _save(self, rollout: Rollout) -> None:
        self._store.save_rollout(
            rollout.id,
            rollout.workspace,
            rollout.pipeline,
            rollout.state,
            rollout.started_ms,
            rollout.record(),
        )

    @staticmethod
    def _name(rollout: Rollout) -> str:
        return f"rollout {rollout.id[:8]}"

    @classmethod
    def _who(cls, rollout: Rollout) -> str:
        """The timeline's requested_by of a rollout's swaps: the rollout, for whom started it."""
        return (
            f"{cls._name(rollout)} ({rollout.requested_by})"
            if rollout.requested_by
            else cls._name(rollout)
        )
