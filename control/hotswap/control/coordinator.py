"""The swap coordinator: two-phase deploys across engines, undeploys, and the desired state.

Deploy = prepare on every assigned engine (old version keeps serving), then — only if all
prepared — record the new version as desired (the commit point, in SQLite) and commit on every
engine. Any prepare failure or timeout, or the caller cancelling before the commit point,
aborts everywhere and changes nothing; past the commit point the swap completes even if the
caller has gone, and engines that did not confirm are named in the result.

An engine that replaces a lost one gets the deployment the same way: a redeploy of the current
version under the pipeline's lock, prepared before it is committed.

Transport-free: engines are reached through an `EnginePort` (the fleet in production, plain
Python engines in tests), and everything here is domain values and dataclasses.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from hotswap.control import placement
from hotswap.control.domain import Deployment, PipelineVersion, pipeline_key
from hotswap.control.engine_port import (
    EngineGone,
    EnginePort,
    EngineRef,
    EngineRefusedSwap,
    PrepareDone,
)
from hotswap.control.errors import DeployConflict, DeployFailed, NoEngines
from hotswap.control.metrics import ControlMetrics
from hotswap.control.store import Store
from hotswap.control.timeline import EngineStage, Swap, SwapTimeline, swap_kind

log = logging.getLogger(__name__)

# Seconds between two attempts to give a pipeline's lost replicas to spare engines.
REFILL_BACKOFF = 10.0
# Rounds of moving a draining engine's deployments (see `_drain`).
DRAIN_PASSES = 3


@dataclass(frozen=True, slots=True)
class DeployResult:
    version: PipelineVersion
    previous: PipelineVersion | None
    # Each engine's stage and timings: the swap's own records, as the timeline keeps them.
    engines: tuple[EngineStage, ...]
    prepare_ms: float
    commit_ms: float
    total_ms: float
    # Engines that did not confirm the commit (they converge from their desired state).
    unconfirmed: tuple[str, ...] = ()


class SwitchLead:
    """How far ahead of now a commit's switch instant is set: long enough that every engine
    has the message by then, short because deploy() waits for it. Learnt from the engines'
    reports of when the message reached them: the slowest delivery of a swap, with a margin,
    rises at once and decays slowly (the next swap likely meets the same load)."""

    FLOOR_US, START_US, CAP_US = 2_000, 10_000, 100_000
    MARGIN = 1.25

    def __init__(self) -> None:
        self.us = self.START_US

    def learn(self, delivery_us: list[int]) -> None:
        """`delivery_us`: per engine, from sending the commit to its arrival there (clock
        differences between hosts included, which the lead must cover too)."""
        if not delivery_us:
            return
        needed = int(max(delivery_us) * self.MARGIN) + 500
        target = max(needed, int(self.us * 0.8))
        self.us = min(self.CAP_US, max(self.FLOOR_US, target))


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


class SwapCoordinator:
    def __init__(
        self,
        store: Store,
        engines: EnginePort,
        *,
        prepare_timeout: float,
        commit_timeout: float,
        timeline: SwapTimeline | None = None,
        metrics: ControlMetrics | None = None,
    ) -> None:
        self._store = store
        self._engines = engines
        self._timeline = timeline
        self._metrics = metrics or ControlMetrics()
        # The swap running per pipeline key, for GetPipelineStatus.
        self.running: dict[str, Swap] = {}
        self._prepare_timeout = prepare_timeout
        self._commit_timeout = commit_timeout
        # Deploys of one pipeline run one at a time; different pipelines swap concurrently.
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # Desired-state revisions only grow, across restarts too (they start at the clock).
        self.revision = int(time.time() * 1000)
        self._started = time.monotonic()
        self._background: set[asyncio.Task[None]] = set()
        self._refilling: set[str] = set()
        self._refilled_at: dict[str, float] = {}
        self._lead = SwitchLead()
        self._draining: dict[str, asyncio.Task[None]] = {}

    # -- desired state (level-triggered) -------------------------------------------------

    def resync(
        self,
        engine: str,
        deployments: list[Deployment] | None = None,
        unless_served: bool = False,
    ) -> None:
        """Sends `engine` its whole desired state (on every connect: level-triggered), from
        `deployments` when the caller has just read them from the store."""
        known = self._store.deployments() if deployments is None else deployments
        desired = [d.version for d in known if engine in d.engines]
        self._engines.push_desired(engine, desired, self.revision, unless_served)

    def engine_connected(self, engine: str) -> None:
        """An engine (re)connected: it gets its desired state, and deployments that lack
        replicas get it by a full two-phase redeploy under the pipeline's lock."""
        for deployment in self._lacking_replicas():
            if engine not in deployment.engines:
                self._start_refill(deployment)
        self.resync(engine)

    def _bump(self, engines: set[str], unless_served: bool = False) -> int:
        self.revision += 1
        # Read once for all of them: each read parses every deployed version, and a swap
        # on 16 engines spent most of its control-plane CPU reading the same rows 16 times.
        deployments = self._store.deployments()
        for name in sorted(engines):
            self.resync(name, deployments, unless_served)
        return self.revision

    def _placeable(self) -> list[EngineRef]:
        """Engines that may take replicas: live and not draining."""
        return [e for e in self._engines.live() if not e.draining]

    def _lacking_replicas(self) -> list[Deployment]:
        starting = time.monotonic() - self._started < 2 * self._engines.lost_after
        deployments = self._store.deployments()
        known = {e for d in deployments for e in d.engines if self._engines.known(e)}
        placeable = {e.name for e in self._placeable()}
        return placement.lacking_replicas(deployments, placeable, starting, known)

    def refill_lost(self) -> None:
        """Moves replicas of lost or draining engines to live spares (called once per
        heartbeat). A pipeline is tried again at most every `REFILL_BACKOFF` seconds."""
        placeable = {e.name for e in self._placeable()}
        for deployment in self._lacking_replicas():
            if placeable - set(deployment.engines):
                self._start_refill(deployment)

    def engine_draining(self, engine: str) -> None:
        """`engine` is shutting down: every deployment on it moves now, together (two-phase
        redeploys onto other engines, the drainer serving until each commit), not after a
        backoff; then the engine hears what it keeps (what no other engine could take: it
        serves that until it exits). One drain per engine runs at a time, however often it
        says so."""
        if engine not in self._draining:
            task = self._spawn(self._drain(engine))
            self._draining[engine] = task
            task.add_done_callback(lambda _: self._draining.pop(engine, None))

    async def _drain(self, engine: str) -> None:
        why = f"control plane (draining engine {engine})"

        # More than one pass: a deploy that was running when the drain began may have placed
        # a pipeline on this engine after the pass that looked.
        def on_it() -> list[Deployment]:
            return [d for d in self._store.deployments() if engine in d.engines]

        placed = on_it()
        for _ in range(DRAIN_PASSES):
            if not placed or not self._placeable():
                break
            keys = {d.version.key for d in placed}
            self._refilling |= keys  # the lost-replica check leaves them to this drain
            try:
                await asyncio.gather(*(self._refill(d, why) for d in placed))
            finally:
                self._refilling -= keys
            before, placed = placed, on_it()
            if placed == before:
                break  # nothing changed (no engine could take them): another pass would not
        self._engines.drained(engine, [d.version.key for d in placed])

    def _start_refill(self, deployment: Deployment) -> None:
        key = deployment.version.key
        now = time.monotonic()
        recent = now - self._refilled_at.get(key, -REFILL_BACKOFF) < REFILL_BACKOFF
        if key in self._refilling or recent:
            return
        self._refilling.add(key)
        self._refilled_at[key] = now
        task = self._spawn(self._refill(deployment))
        task.add_done_callback(lambda _: self._refilling.discard(key))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _refill(
        self, deployment: Deployment, why: str = "control plane (replacing lost engines)"
    ) -> None:
        version = deployment.version
        current = self._store.get_pipeline(version.workspace, version.pipeline).deployment
        if current is None or current.version.number != version.number:
            return  # undeployed or redeployed meanwhile: that deploy placed it
        try:
            await self.deploy(
                version.workspace,
                version.pipeline,
                version.number,
                deployment.replicas,
                version.number,
                requested_by=why,
            )
        except (DeployConflict, DeployFailed, NoEngines) as exc:
            # Another deploy moved on, or the engine could not prepare: the timeline says which.
            log.warning("could not refill replicas of %s: %s", version.key, exc)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    # -- deploy -----------------------------------------------------------------------------

    def _choose_engines(self, current: Deployment | None, replicas: int) -> list[str]:
        candidates = self._placeable()
        if not candidates:
            draining = [e.name for e in self._engines.live() if e.draining]
            raise NoEngines(
                (f"every connected engine is shutting down ({', '.join(draining)}): " if draining
                 else "no engine is connected to the control plane: ")
                + "start one with 'hotswap engine --control HOST:PORT' (or use 'hotswap up')"
            )  # fmt: skip
        assigned = set(current.engines) if current else set()
        return placement.choose_engines(candidates, assigned, self._store.deployments(), replicas)

    async def deploy(
        self,
        workspace: str,
        pipeline: str,
        number: int,
        replicas: int,
        expected_current: int | None,
        *,
        requested_by: str = "",
        request_id: str = "",
        note: str = "",
    ) -> DeployResult:
        """Deploys version `number` (0: the latest); `note` says what made the swap, for the
        timeline (a rollout's step and the numbers that decided it)."""
        started = time.perf_counter()
        async with self._locks[pipeline_key(workspace, pipeline)]:
            version = self._store.pipeline_version(workspace, pipeline, number)
            current = self._store.get_pipeline(workspace, pipeline).deployment
            current_number = current.version.number if current else 0
            kind = swap_kind(current_number, version.number)
            swap = Swap(str(uuid.uuid4()), workspace, pipeline, kind, current_number,
                        version.number, requested_by, request_id, note=note)  # fmt: skip
            try:
                result = await self._swap(swap, version, current, replicas, expected_current)
            except (DeployConflict, NoEngines) as exc:
                self._finish(swap, started, "rejected", str(exc))
                raise
            except DeployFailed as exc:
                self._finish(swap, started, "aborted", str(exc))
                raise
            except asyncio.CancelledError:
                if swap.committed:  # the swap finished for a caller who left
                    self._finish(swap, started, "ok", "the caller cancelled after the commit point")
                else:
                    self._finish(swap, started, "aborted", "the caller cancelled the deploy")
                raise
            except BaseException as exc:
                self._finish(swap, started, "aborted", f"unexpected {type(exc).__name__}: {exc}")
                raise
            self._finish(swap, started, "ok", _unconfirmed_reason(result.unconfirmed))
        return result

    def _finish(self, swap: Swap, started: float, outcome: str, reason: str = "") -> None:
        swap.finish(outcome, reason)
        self.running.pop(pipeline_key(swap.workspace, swap.pipeline), None)
        if self._timeline is not None:
            self._timeline.write(swap)
        seconds = time.perf_counter() - started
        self._metrics.deploys.labels(swap.kind, outcome).inc()
        self._metrics.deploy_seconds.labels(outcome).observe(seconds)

    def _begin(self, swap: Swap, version: PipelineVersion, engines: list[str]) -> None:
        swap.engines = {e: EngineStage(e, self._engines.address_of(e)) for e in engines}
        self.running[version.key] = swap
        if self._timeline is not None:
            self._timeline.write(swap)
        log.info(
            "deploy %s v%d (swap %s) on %s",
            version.key,
            version.number,
            swap.swap_id,
            ", ".join(engines),
        )

    async def _swap(
        self,
        swap: Swap,
        version: PipelineVersion,
        current: Deployment | None,
        replicas: int,
        expected_current: int | None,
    ) -> DeployResult:
        started = time.perf_counter()
        current_number = current.version.number if current else 0
        if expected_current is not None and expected_current != current_number:
            raise DeployConflict(
                f"pipeline {version.pipeline!r} is at version {current_number}, not "
                f"{expected_current}: someone else deployed first; reload and retry"
            )
        replicas = replicas or (current.replicas if current else 1)
        engines = self._choose_engines(current, replicas)
        self._begin(swap, version, engines)

        prepare_start = time.perf_counter()
        try:
            await self._prepare_all(engines, swap, version, current)
        except asyncio.CancelledError:
            self._abort_all(engines, swap, "the caller cancelled the deploy")
            raise
        swap.prepare_ms = _ms_since(prepare_start)
        self._metrics.swap_phase_seconds.labels("prepare").observe(swap.prepare_ms / 1000)

        # Commit point: from here the new version is what every engine must serve, and the
        # commit runs to its end even if the caller cancels (it is shielded below).
        self._store.set_deployment(version, replicas, engines)
        swap.committed = True
        commit_start = time.perf_counter()
        commit = asyncio.ensure_future(self._commit_all(engines, swap))
        try:
            await asyncio.shield(commit)
        except asyncio.CancelledError:
            await commit
            raise
        finally:
            dropped = set(current.engines if current else ()) - set(engines)
            # An engine whose commit answer says it runs its desired state already gets no
            # copy of it; the others (dropped, unconfirmed) converge from it.
            self._bump(dropped | set(engines), unless_served=True)
        swap.commit_ms = _ms_since(commit_start)
        self._metrics.swap_phase_seconds.labels("commit").observe(swap.commit_ms / 1000)
        return _result(swap, version, current, _ms_since(started))

    async def _prepare_one(self, engine: str, swap: Swap, version: PipelineVersion) -> None:
        stage = swap.engines[engine]
        start = time.perf_counter()
        try:
            answer = await self._ask_prepare(engine, swap, version)
        except DeployFailed as exc:
            stage.stage, stage.error = "failed", str(exc)
            raise
        stage.prepare_ms = _ms_since(start)
        stage.stage = "prepared"
        stage.fetch_ms, stage.load_ms = answer.fetch_ms, answer.load_ms
        stage.warmup_ms, stage.reused = answer.warmup_ms, answer.reused
        observe = self._metrics.engine_stage_seconds.labels
        observe("prepare").observe(stage.prepare_ms / 1000)
        if not answer.reused:
            observe("fetch").observe(answer.fetch_ms / 1000)
            observe("build").observe(answer.load_ms / 1000)
            observe("warmup").observe(answer.warmup_ms / 1000)

    async def _ask_prepare(self, engine: str, swap: Swap, version: PipelineVersion) -> PrepareDone:
        timeout = self._prepare_timeout
        try:
            return await self._engines.prepare(
                engine, swap.swap_id, version, swap.request_id, timeout
            )
        except TimeoutError:
            raise DeployFailed(
                f"engine {engine} did not prepare within {timeout:g}s "
                "(raise --prepare-timeout for large models, or check the engine)"
            ) from None
        except EngineGone as exc:
            raise DeployFailed(f"{exc} while preparing") from None
        except EngineRefusedSwap as exc:
            raise DeployFailed(f"engine {engine} failed to prepare: {exc}") from None

    async def _prepare_all(
        self,
        engines: list[str],
        swap: Swap,
        version: PipelineVersion,
        current: Deployment | None,
    ) -> None:
        tasks = [asyncio.ensure_future(self._prepare_one(e, swap, version)) for e in engines]
        # Wait for the first failure, not for every engine: a stalled one must not delay abort.
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            raise
        failure = next((t.exception() for t in done if t.exception() is not None), None)
        if failure is None:
            return
        for task in pending:
            task.cancel()
        self._abort_all(engines, swap, str(failure))
        kept = f"version {current.version.number} keeps serving" if current else "nothing changed"
        log.warning("deploy %s v%d aborted: %s", version.key, version.number, failure)
        raise DeployFailed(
            f"deploy of {version.pipeline!r} version {version.number} aborted: {failure}; {kept}"
        )

    def _abort_all(self, engines: list[str], swap: Swap, reason: str) -> None:
        for engine in engines:
            self._engines.abort(engine, swap.swap_id, reason, swap.request_id)

    async def _commit_one(self, engine: str, swap: Swap, switch_at_us: int) -> int:
        """Commits on `engine`; returns when the message reached it (Unix µs; 0 unknown)."""
        start = time.perf_counter()
        stage = swap.engines[engine]
        stage.stage = "committing"
        try:
            answer = await self._engines.commit(
                engine, swap.swap_id, swap.request_id, self._commit_timeout, switch_at_us
            )
        except (TimeoutError, EngineGone) as exc:
            # Past the commit point the engine converges from its desired state on reconnect;
            # until then GetPipelineEndpoints leaves it out, so reads still see the new version.
            log.warning("engine %s did not confirm commit %s: %s", engine, swap.swap_id, exc)
            stage.stage, stage.error = "failed", f"no commit confirmation: {exc or 'timeout'}"
            stage.commit_ms = stage.switch_us = -1.0
            return 0
        except EngineRefusedSwap as exc:
            stage.stage, stage.error = "failed", str(exc)
            stage.commit_ms = _ms_since(start)
            return 0
        stage.commit_ms, stage.switch_us = _ms_since(start), answer.switch_us
        stage.switched_at_us = answer.switched_at_us
        stage.stage = "committed"
        self._metrics.engine_stage_seconds.labels("commit").observe(stage.commit_ms / 1000)
        return answer.received_at_us

    async def _commit_all(self, engines: list[str], swap: Swap) -> None:
        """Commits everywhere. Several engines switch together at one instant a little ahead
        (`SwitchLead`), rather than one by one as their messages arrive."""
        sent_us = time.time_ns() // 1000
        switch_at_us = sent_us + self._lead.us if len(engines) > 1 else 0
        received = await asyncio.gather(*(self._commit_one(e, swap, switch_at_us) for e in engines))
        if switch_at_us:
            # A report past the round trip is a clock ahead of ours (or a lie), not a slow
            # delivery: capped there, one engine cannot hold every swap's lead at its cap.
            round_trip_us = time.time_ns() // 1000 - sent_us
            self._lead.learn([min(r - sent_us, round_trip_us) for r in received if r])

    # -- undeploy -------------------------------------------------------------------------

    async def undeploy(
        self,
        workspace: str,
        pipeline: str,
        timeout: float | None = None,
        *,
        requested_by: str = "",
        request_id: str = "",
    ) -> list[str]:
        """Undeploys; returns the engines that did not confirm the release within `timeout`
        (they release it when they next apply their desired state)."""
        started = time.perf_counter()
        async with self._locks[pipeline_key(workspace, pipeline)]:
            current = self._store.get_pipeline(workspace, pipeline).deployment
            before = current.version.number if current else 0
            swap = Swap(str(uuid.uuid4()), workspace, pipeline, "undeploy", before, 0,
                        requested_by, request_id)  # fmt: skip
            try:
                unconfirmed = await self._undeploy(swap, timeout or self._commit_timeout)
            except DeployFailed as exc:
                self._finish(swap, started, "rejected", str(exc))
                raise
            self._finish(swap, started, "ok", _unconfirmed_reason(unconfirmed, "release"))
        return unconfirmed

    async def _undeploy(self, swap: Swap, timeout: float) -> list[str]:
        previous = self._store.delete_deployment(swap.workspace, swap.pipeline)
        if previous is None:
            raise DeployFailed(f"pipeline {swap.pipeline!r} is not deployed")
        for name in previous.engines:
            swap.engines[name] = EngineStage(name, self._engines.address_of(name), "committed")
        revision = self._bump(set(previous.engines))
        # Best effort: an engine that is away releases on reconnect (level-triggered).
        applied = await asyncio.gather(
            *(self._engines.wait_applied(name, revision, timeout) for name in previous.engines)
        )
        unconfirmed = [name for name, ok in zip(previous.engines, applied, strict=True) if not ok]
        for name in unconfirmed:
            swap.engines[name].stage = "failed"
            swap.engines[name].error = "did not confirm the release"
        return unconfirmed


def _result(
    swap: Swap, version: PipelineVersion, current: Deployment | None, total_ms: float
) -> DeployResult:
    timings = tuple(swap.engines.values())
    unconfirmed = tuple(st.engine for st in swap.engines.values() if st.stage != "committed")
    return DeployResult(
        version,
        current.version if current else None,
        timings,
        swap.prepare_ms,
        swap.commit_ms,
        total_ms,
        unconfirmed,
    )


def _unconfirmed_reason(engines: tuple[str, ...] | list[str], what: str = "commit") -> str:
    if not engines:
        return ""
    return f"engines {', '.join(engines)} did not confirm the {what}; they converge on reconnect"
