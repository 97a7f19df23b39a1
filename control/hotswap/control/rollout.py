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
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from hotswap.control.coordinator import SwapCoordinator
from hotswap.control.domain import Deployment, PipelineVersion, pipeline_key
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
# A rollback that cannot be deployed (no engine connected yet) is retried, this far apart
# at most, until it lands or someone else deploys the pipeline.
ROLLBACK_RETRY_MAX = 10.0
# A running rollout's numbers are saved at most this often (state changes at once).
SAVE_EVERY = 5.0
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
    # The process instance of each engine serving the step, when first seen: an engine that
    # restarts during the step lost its counts (a challenger that crashes it must not pass).
    engines: dict[str, str] = field(default_factory=dict)


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
    # running | rolling_back | completed | rolled_back | aborted | failed
    state: str = "running"
    rollback_to: str = ""  # while rolling back: the state it ends in
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
    if len(percents) > MAX_STEPS:
        raise InvalidArgument(f"a rollout has at most {MAX_STEPS} steps, not {len(percents)}")
    shares = tuple(float(p) for p in percents) or DEFAULT_PERCENTS
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
    """Starts, watches, resumes and aborts rollouts; one at a time per pipeline.

    Every swap a rollout makes runs in a task of this object, never in the RPC that asked
    for it: a caller that goes away (a deadline, Ctrl-C) cannot leave a split half-made or
    unwatched. The record is saved before each swap with what it is about to do, so a
    restart finishes what was decided.
    """

    def __init__(
        self,
        store: Store,
        coordinator: SwapCoordinator,
        traffic: Callable[[str], list[tuple[str, types_pb2.ModelTraffic]]],
        instance_of: Callable[[str], str],
        *,
        poll: float = POLL_SECONDS,
    ) -> None:
        self._store = store
        self._coordinator = coordinator
        self._traffic = traffic
        self._instance_of = instance_of
        self._poll = poll
        self._running: dict[str, Rollout] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._saved: dict[str, float] = {}  # rollout id -> monotonic time of its last save
        # Set when engines report new counts: the watchers decide then, not a poll later.
        self._news = asyncio.Event()

    # -- the API ----------------------------------------------------------------------------

    def wake(self) -> None:
        """New counts arrived: the watchers look at them now."""
        if self._running:
            self._news.set()

    def running(self, workspace: str, pipeline: str) -> Rollout | None:
        return self._running.get(pipeline_key(workspace, pipeline))

    def latest(self, workspace: str, pipeline: str, rollout_id: str = "") -> Rollout:
        """The pipeline's running or newest rollout, or the one with `rollout_id`."""
        live = self.running(workspace, pipeline)
        if live is not None and rollout_id in ("", live.id):
            return live
        self._store.get_pipeline(workspace, pipeline)  # NOT_FOUND for an unknown pipeline
        found = self._store.rollouts(workspace, pipeline, rollout_id=rollout_id, limit=1)
        if not found:
            raise NotFound(
                f"pipeline {pipeline!r} has no rollout {rollout_id!r}"
                if rollout_id
                else f"pipeline {pipeline!r} has had no rollout"
            )
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
        if key in self._running:
            raise FailedPrecondition(
                f"a rollout of pipeline {pipeline!r} is running: wait for it, or abort it"
            )
        shares = check_percents(percents)
        error_rate = DEFAULT_MAX_ERROR_RATE if max_error_rate is None else max_error_rate
        latency = max_latency_ratio or DEFAULT_MAX_LATENCY_RATIO
        seconds = step_seconds or DEFAULT_STEP_SECONDS
        if not (
            0 <= error_rate <= 1
            and 0 < latency < math.inf
            and 0 < seconds <= 86_400
            and 0 <= min_requests <= 1_000_000_000
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
        self._running[key] = rollout  # from here a second start is refused
        self._save(rollout)
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        first.add_done_callback(lambda f: f.cancelled() or f.exception())  # read either way
        self._spawn(rollout, self._begin(rollout, first))
        await asyncio.shield(first)
        return rollout

    async def abort(self, workspace: str, pipeline: str, reason: str = "") -> Rollout:
        """Stops the running rollout and swaps back to its baseline."""
        rollout = self.running(workspace, pipeline)
        if rollout is None:
            raise FailedPrecondition(f"no rollout of pipeline {pipeline!r} is running")
        if rollout.state == "rolling_back":
            raise FailedPrecondition(
                f"the rollout of pipeline {pipeline!r} is already swapping back: {rollout.reason}"
            )
        why = f"aborted: {reason.strip()[:200] or 'AbortRollout'}"
        # The decision is saved before the watcher stops: a restart finishes it.
        self._decide_rollback(rollout, "aborted", why)
        watcher = self._tasks.get(rollout.key)
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        task = self._spawn(rollout, self._roll_back(rollout))
        await asyncio.shield(task)
        return rollout

    def resume(self) -> None:
        """At start: finish each rollout the store says is not over. A decided rollback is
        carried out; a running rollout is watched again from the step that serves; one
        whose pipeline serves something else ends, leaving that as it is."""
        for record in self._store.rollouts(states=("running", "rolling_back")):
            rollout = Rollout.from_record(record)
            self._running[rollout.key] = rollout
            if rollout.state == "rolling_back":
                log.info("finishing the rollback of rollout %s of %s", rollout.id, rollout.key)
                self._spawn(rollout, self._roll_back(rollout))
                continue
            serving = self._serving(rollout)
            ours = {s.version: s for s in rollout.steps}
            if serving not in ours:
                what = (
                    "the version before it"
                    if serving == rollout.baseline_version
                    else f"version {serving}"
                )
                self._end(
                    rollout,
                    "aborted",
                    f"the control plane restarted and the pipeline "
                    f"serves {what}, not the rollout's: left as it is",
                )
                continue
            current = rollout.steps[-1]
            if current.version != serving:  # an advance the restart cut short
                current.outcome, current.ended_ms = "stopped", now_ms()
                current.reason = "the control plane stopped before this step was deployed"
                rollout.steps.append(
                    RolloutStep(ours[serving].percent, serving, now_ms(), engines={})
                )
            log.info(
                "resuming rollout %s of %s at %g%%",
                rollout.id,
                rollout.key,
                rollout.steps[-1].percent,
            )
            self._save(rollout)
            self._spawn(rollout, self._watch_forever(rollout))

    async def close(self) -> None:
        """Stops watching (a control plane stopping): the records stay as they are, and the
        next start resumes them."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- the tasks --------------------------------------------------------------------------

    def _spawn(self, rollout: Rollout, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work, name=f"rollout {rollout.id}")
        self._tasks[rollout.key] = task

        def done(finished: asyncio.Task[None]) -> None:
            if self._tasks.get(rollout.key) is finished:
                del self._tasks[rollout.key]

        task.add_done_callback(done)
        return task

    async def _begin(self, rollout: Rollout, first: asyncio.Future[None]) -> None:
        shares = rollout.percents
        note = (
            f"{self._name(rollout)}: step 1 of {len(shares)}, {shares[0]:g}% to "
            f"{rollout.challenger['name']}"
        )
        try:
            await self._deploy_step(rollout, 0, rollout.baseline_version, note)
        except ControlError as exc:
            self._end(rollout, "failed", f"the first step could not be deployed: {exc}")
            first.set_exception(exc)
            return
        except BaseException:  # cancelled (a control plane stopping, or an abort)
            first.cancel()
            raise
        first.set_result(None)
        await self._watch_forever(rollout)

    async def _watch_forever(self, rollout: Rollout) -> None:
        try:
            while rollout.state == "running":
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._news.wait(), self._poll)
                # Set wakes every waiting watcher; one busy meanwhile sees it a poll later.
                self._news.clear()
                await self._decide(rollout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not leave traffic split with no one watching
            log.exception("rollout %s failed", rollout.id)
            self._decide_rollback(rollout, "failed", f"the rollout stopped on an error: {exc}")
            await self._roll_back(rollout)

    async def _decide(self, rollout: Rollout) -> None:
        step = rollout.steps[-1]
        index = len(rollout.steps) - 1
        # One read of the deployment a poll: what serves, on which engines (a poll runs on
        # every heartbeat that carries counts).
        deployment = self._store.get_pipeline(rollout.workspace, rollout.pipeline).deployment
        serving = deployment.version.number if deployment else 0
        if deployment is None or serving != step.version:
            self._end(
                rollout,
                "aborted",
                f"the pipeline was deployed by someone else (version "
                f"{serving} serves): left as it is",
            )
            return
        if step.percent >= 100:
            step.outcome, step.ended_ms = "passed", now_ms()
            self._end(rollout, "completed", f"{rollout.challenger['name']} serves alone")
            return
        broken = self._restarted(step, deployment.engines)
        if not broken:
            self._count(rollout, step, deployment)
            broken = judge(rollout, step)
        if broken:
            step.outcome, step.reason, step.ended_ms = "failed", broken, now_ms()
            self._decide_rollback(
                rollout, "rolled_back", f"step {index + 1} ({step.percent:g}%): {broken}"
            )
            await self._roll_back(rollout)
            return
        elapsed = (now_ms() - step.started_ms) / 1000
        if elapsed < rollout.step_seconds or step.challenger.requests < rollout.min_requests:
            self._save(rollout, force=False)  # the numbers so far, for status()
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
            self._decide_rollback(
                rollout, "failed", f"step {index + 2} could not be deployed: {exc}"
            )
            await self._roll_back(rollout)

    def _serving(self, rollout: Rollout) -> int:
        deployment = self._store.get_pipeline(rollout.workspace, rollout.pipeline).deployment
        return deployment.version.number if deployment else 0

    def _restarted(self, step: RolloutStep, engines: Sequence[str]) -> str:
        """Which of the step's engines restarted during it, in words ("" when none)."""
        for engine in engines:
            instance = self._instance_of(engine)
            if not instance:
                continue
            seen = step.engines.setdefault(engine, instance)
            if seen != instance:
                return (
                    f"engine {engine} restarted during the step (its counts of the challenger "
                    "were lost with it; a model that crashes engines must not pass)"
                )
        return ""

    def _count(self, rollout: Rollout, step: RolloutStep, deployment: Deployment) -> None:
        """Sums the step's counts (the deployed version's) over the engines the deployment
        assigned (only theirs: an engine's word counts for its own assignments)."""
        assigned = set(deployment.engines)
        champion, challenger = Served(), Served()
        for engine, t in self._traffic(deployment.version.version_id):
            if engine not in assigned or t.step != rollout.step or t.arm not in (0, 1):
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
            await self._swap(rollout, version.number, current, note)
        except ControlError as exc:
            step = rollout.steps[-1]
            step.outcome, step.reason, step.ended_ms = "stopped", str(exc), now_ms()
            self._save(rollout)
            raise
        log.info("%s", note)

    async def _swap(self, rollout: Rollout, number: int, current: int, note: str) -> None:
        """Deploys version `number` if `current` still serves (else DeployConflict), keeping
        the replica count, in the timeline under the rollout's name with `note`."""
        await self._coordinator.deploy(
            rollout.workspace,
            rollout.pipeline,
            number,
            0,
            current,
            requested_by=self._who(rollout),
            note=note,
        )

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

    def _decide_rollback(self, rollout: Rollout, state: str, reason: str) -> None:
        """Saves the decision to swap back, before any swap: a restart carries it out."""
        step = rollout.steps[-1] if rollout.steps else None
        if step is not None and step.outcome == "running":
            step.outcome, step.ended_ms = "stopped", now_ms()
        rollout.state, rollout.rollback_to, rollout.reason = "rolling_back", state, reason
        self._save(rollout)

    async def _roll_back(self, rollout: Rollout) -> None:
        """A hot swap to the baseline, retried until it lands or someone else deploys."""
        note = (
            f"{self._name(rollout)}: rolled back to version {rollout.baseline_version}: "
            f"{rollout.reason}"
        )
        reason, wait = rollout.reason, 0.5
        while True:
            serving = self._serving(rollout)
            if serving == rollout.baseline_version:
                break  # done, perhaps by the try before a restart
            if serving not in {s.version for s in rollout.steps}:
                reason += f" (version {serving} was deployed by someone else meanwhile: left)"
                break
            try:
                await self._swap(rollout, rollout.baseline_version, serving, note)
                log.warning("%s", note)
                break
            except DeployConflict:
                continue  # someone deployed between the read and the swap: look again
            except ControlError as exc:
                log.error(
                    "rollout %s: rollback to v%d failed (retrying in %.1f s): %s",
                    rollout.id,
                    rollout.baseline_version,
                    wait,
                    exc,
                )
                rollout.reason = f"{reason}; swapping back failed, retrying: {exc}"
                self._save(rollout, force=False)
                await asyncio.sleep(wait)
                wait = min(wait * 2, ROLLBACK_RETRY_MAX)
        self._end(rollout, rollout.rollback_to or "rolled_back", reason)

    def _end(self, rollout: Rollout, state: str, reason: str) -> None:
        for step in rollout.steps:
            if step.outcome == "running":  # cut short (an abort during an advance)
                step.outcome, step.ended_ms = "stopped", now_ms()
        rollout.state, rollout.reason, rollout.ended_ms = state, reason, now_ms()
        rollout.rollback_to = ""
        rollout.final_version = self._serving(rollout)  # what serves, whatever was meant
        self._save(rollout)
        if self._running.get(rollout.key) is rollout:
            del self._running[rollout.key]
        self._saved.pop(rollout.id, None)

    def _save(self, rollout: Rollout, force: bool = True) -> None:
        """Writes the record; `force=False` skips it when it was written in the last
        SAVE_EVERY seconds (the numbers of a running step: each write is an fsync)."""
        now = asyncio.get_running_loop().time()
        if not force and now - self._saved.get(rollout.id, -math.inf) < SAVE_EVERY:
            return
        self._saved[rollout.id] = now
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
        name = cls._name(rollout)
        return f"{name} ({rollout.requested_by})" if rollout.requested_by else name
