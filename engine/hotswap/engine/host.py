"""The engine's serving state: which loaded pipeline version is active for each pipeline.

The heart of the hot swap. A request looks up the active `LoadedPipeline` once and runs on that
object to the end, so it is served wholly by one version. A swap replaces one dict entry — no
lock is held across inference — and the old object is freed when its last request finishes
(or kept for `retain_seconds`, so a rollback to it is a pointer flip).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hotswap.engine.blob_cache import BlobCache
from hotswap.engine.errors import NotPrepared, PipelineLoading, PipelineNotServed, PrepareError
from hotswap.engine.runtime import (
    LoadedPipeline,
    PipelineSpec,
    RuntimeOptions,
    SplitSpec,
    StepSpec,
    usable,
)
from hotswap.engine.settings import NAME

log = logging.getLogger(__name__)


def _free(holder: list[LoadedPipeline]) -> None:
    """Drops the last references (sessions are freed here, off the event loop) and gives the
    freed memory back to the OS."""
    holder.clear()
    _malloc_trim()


def _malloc_trim() -> None:
    # Not glibc: the memory is still freed, only maybe not returned to the OS yet.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass(frozen=True, slots=True)
class ModelRef:
    name: str
    version: str
    sha256: str


@dataclass(frozen=True, slots=True)
class SplitRef:
    """A step of several models (StepSplit) as the control plane describes it."""

    step: int
    kind: str  # splits.KINDS
    models: tuple[ModelRef, ...]
    weights: tuple[float, ...] = ()
    key: str = ""
    key_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class VersionRef:
    """A pipeline version as the control plane describes it (models by sha, not by path)."""

    workspace: str
    pipeline: str
    version_id: str
    number: int
    models: tuple[ModelRef, ...]
    splits: tuple[SplitRef, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.workspace}/{self.pipeline}"


@dataclass(frozen=True, slots=True)
class Prepared:
    fetch_ms: float
    load_ms: float
    warmup_ms: float
    reused: bool


@dataclass(frozen=True, slots=True)
class PipelineState:
    """What the engine reports for one pipeline."""

    key: str
    active: LoadedPipeline | None
    state: str  # Running | Loading | Error
    error: str


class Changes:
    """A change counter that any number of observers can wait on (level-triggered: an
    observer that was busy sees that something changed, not each change)."""

    def __init__(self) -> None:
        self.count = 0
        self._event = asyncio.Event()

    def notify(self) -> None:
        self.count += 1
        self._event.set()
        self._event = asyncio.Event()

    async def wait_after(self, seen: int) -> None:
        """Returns once `count` has moved past `seen`."""
        while self.count <= seen:
            await self._event.wait()


# The swap id prefix of versions the desired state loads (not swaps the control plane runs).
DESIRED_SWAP = "desired:"


def _everything(workspace: str) -> bool:
    return True


class EngineHost:
    def __init__(
        self,
        cache: BlobCache,
        options: RuntimeOptions,
        retain_seconds: float,
        retain_versions: int = 2,
    ) -> None:
        self._retain_versions = retain_versions
        self._cache = cache
        self._options = options
        self._retain_seconds = retain_seconds
        self._active: dict[str, LoadedPipeline] = {}
        self._prepared: dict[str, LoadedPipeline] = {}
        # Swaps being prepared; abort removes its id, so a build that finishes later is dropped.
        self._preparing: set[str] = set()
        # Versions swapped out recently, by version id, with the monotonic time they expire.
        self._retained: dict[str, tuple[LoadedPipeline, float]] = {}
        # Versions no longer held by the host, waiting for their last request to finish so
        # they can be freed on a worker thread (freeing big sessions on the loop stalls it).
        self._graveyard: list[LoadedPipeline] = []
        # One thread builds (and frees) sessions. Not at a lower OS priority: ONNX Runtime
        # holds the GIL in parts of session construction, and a descheduled low-priority
        # holder stalled the event loop 40-86 ms instead of 5-13 ms (docs/adr/0003).
        self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="build")
        # Pipelines assigned by the desired state but not active yet: key -> Loading | error.
        self._pending: dict[str, str] = {}
        self._reconcile_lock = asyncio.Lock()
        # Whether a desired state from the control plane has been applied: until then the
        # engine cannot know what it is meant to serve (health checks answer NOT_SERVING).
        self.synced = False
        # Shutting down: health answers NOT_SERVING so balancers and probes send no more.
        self.draining = False
        # Wall-clock instant (Unix µs) from which the last commit's version served.
        self.switched_at_us = 0
        # Swaps committed per pipeline (not counting the desired state's own loads).
        self._swaps: dict[str, int] = {}
        # Commits scheduled for an instant (swap id -> Unix µs), and those a request switched
        # before the commit call came (swap id -> the switch's µs and instant).
        self._due: dict[str, int] = {}
        self._switched: dict[str, tuple[float, int]] = {}
        # Counts changes to what is active or assigned; health checks wait on it.
        self.changes = Changes()

    # -- request path -----------------------------------------------------------------------

    def lookup(
        self, workspace: str, pipeline: str, visible: Callable[[str], bool] = _everything
    ) -> LoadedPipeline:
        """The active version to serve one request. Call once per request.

        Without `workspace`, the pipeline is found by name among the workspaces `visible`
        admits (the caller's), and it must be the only one of that name there.
        """
        if self._due:  # a switch is scheduled: has its instant come?
            self._switch_due()
        found = (
            self._active.get(f"{workspace}/{pipeline}")
            if workspace and visible(workspace)
            else None
        )
        if found is not None:
            return found
        active = {k: p for k, p in self._active.items() if visible(k.split("/", 1)[0])}
        pending = [k for k in self._pending if visible(k.split("/", 1)[0])]
        if not workspace:
            matches = [p for k, p in active.items() if k.split("/", 1)[1] == pipeline]
            if not pipeline and len(active) == 1:
                matches = list(active.values())
            if len(matches) == 1:
                return matches[0]
        key = f"{workspace}/{pipeline}"
        if key in pending or (not workspace and any(k.endswith(f"/{pipeline}") for k in pending)):
            raise PipelineLoading(f"pipeline {pipeline!r} is still loading on this engine; retry")
        served = ", ".join(sorted(active)) or "nothing"
        raise PipelineNotServed(
            f"this engine does not serve pipeline {key if workspace else pipeline!r} "
            f"(it serves {served}); is it deployed?"
        )

    # -- two-phase swap -------------------------------------------------------------------

    def _reusable(self, ref: VersionRef) -> LoadedPipeline | None:
        self._expire()
        active = self._active.get(ref.key)
        if active is not None and active.spec.version_id == ref.version_id:
            return active
        retained = self._retained.get(ref.version_id)
        return retained[0] if retained else None

    async def _build(self, ref: VersionRef) -> tuple[LoadedPipeline, Prepared]:
        for kind, name in (("workspace", ref.workspace), ("pipeline", ref.pipeline)):
            # Names become inference-log directories and metric labels: checked, whoever sent.
            if not NAME.fullmatch(name):
                raise PrepareError(f"the control plane sent an invalid {kind} name {name[:40]!r}")
        reused = self._reusable(ref)
        if reused is not None:
            return reused, Prepared(0.0, 0.0, 0.0, reused=True)
        start = time.perf_counter()
        paths: dict[str, Path] = {}
        for m in [*ref.models, *(m for split in ref.splits for m in split.models)]:
            if m.sha256 not in paths:
                paths[m.sha256] = await self._cache.ensure(m.sha256)
        fetch_ms = (time.perf_counter() - start) * 1000

        def local(models: tuple[ModelRef, ...]) -> tuple[StepSpec, ...]:
            return tuple(StepSpec(m.name, m.version, m.sha256, paths[m.sha256]) for m in models)

        spec = PipelineSpec(
            workspace=ref.workspace,
            pipeline=ref.pipeline,
            version_id=ref.version_id,
            number=ref.number,
            steps=local(ref.models),
            splits=tuple(
                SplitSpec(s.step, s.kind, local(s.models), s.weights, s.key, s.key_values)
                for s in ref.splits
            ),
        )
        twin = self._same_steps(spec)
        if twin is not None:
            # The same models in the same order are loaded, chained and warm already (a new
            # version of a pipeline that only changed metadata, or a swap back and forth):
            # their sessions serve this version too, with nothing to build or warm up, and
            # the twin's measured row time decides inline execution as it did for the twin.
            loaded = LoadedPipeline.build(
                spec, self._options, twin.sessions_by_sha(), warm_up=False
            )
            loaded.row_ms = twin.row_ms
            return loaded, Prepared(fetch_ms, 0.0, 0.0, reused=True)
        # Sessions are built from file paths in a worker thread: the event loop keeps serving.
        loaded = await asyncio.get_running_loop().run_in_executor(
            self._builder, LoadedPipeline.build, spec, self._options, self._loaded_sessions()
        )
        return loaded, Prepared(fetch_ms, loaded.load_ms, loaded.warmup_ms, reused=False)

    def _same_steps(self, spec: PipelineSpec) -> LoadedPipeline | None:
        """A held version (active or retained) with exactly `spec`'s models in `spec`'s
        steps and splits (the weights may differ: a rollout's steps), if there is one."""
        shape = _models_shape(spec)
        held = [*self._active.values(), *(p for p, _ in self._retained.values())]
        return next((p for p in held if _models_shape(p.spec) == shape and p.healthy), None)

    def traffic(self) -> list[tuple[PipelineSpec, list[Any]]]:
        """What the models of each held version's split and shadow steps served
        (`LoadedPipeline.traffic`), for the versions that have such steps."""
        return [(p.spec, p.traffic()) for p in self.loaded_versions() if p.spec.splits]

    def _loaded_sessions(self) -> dict[str, Any]:
        """Sessions held by the active and retained versions, by model sha: a new version
        with a model one of them already runs shares its session instead of building it."""
        held = [*self._active.values(), *(p for p, _ in self._retained.values())]
        return {
            sha: session
            for p in held
            for sha, session in p.sessions_by_sha().items()
            if usable(session)
        }

    async def prepare(self, swap_id: str, ref: VersionRef) -> Prepared:
        """Phase 1. Raises PrepareError (with a message for a person) when it cannot."""
        self._preparing.add(swap_id)
        try:
            loaded, prepared = await self._build(ref)
            if swap_id not in self._preparing:
                raise PrepareError(f"swap {swap_id} was aborted while preparing")
        finally:
            self._preparing.discard(swap_id)
        self._prepared[swap_id] = loaded
        return prepared

    def schedule(self, swap_id: str, at_us: int) -> None:
        """Phase 2 at an instant: from `at_us` (Unix µs, this engine's clock) on, every lookup
        gets the prepared version, whichever comes first: the first request after the instant
        or `commit`, which the caller runs at (or after) it. Every engine of a swap given the
        same instant thus switches at once, whenever its own timer fires."""
        if swap_id not in self._prepared:
            raise NotPrepared(f"swap {swap_id} was not prepared on this engine (or was aborted)")
        self._due[swap_id] = at_us

    def _switch_due(self, everything: bool = False) -> None:
        now_us = time.time_ns() // 1000
        for swap_id, at_us in list(self._due.items()):
            if everything or now_us >= at_us:
                switch_us = self._switch(swap_id, min(at_us, now_us))
                self._switched[swap_id] = (switch_us, self.switched_at_us)

    def commit(self, swap_id: str) -> float:
        """Phase 2: makes the prepared version active (if a request after its scheduled
        instant has not already). Returns the switch time in µs; `switched_at_us` says from
        when this swap's version served."""
        if swap_id in self._due:
            self._switch_due()
        if swap_id in self._switched:
            switch_us, self.switched_at_us = self._switched.pop(swap_id)
            return switch_us
        return self._switch(swap_id, time.time_ns() // 1000)

    def _switch(self, swap_id: str, at_us: int) -> float:
        self._due.pop(swap_id, None)
        loaded = self._prepared.pop(swap_id, None)
        if loaded is None:
            raise NotPrepared(f"swap {swap_id} was not prepared on this engine (or was aborted)")
        start = time.perf_counter_ns()
        key = f"{loaded.spec.workspace}/{loaded.spec.pipeline}"
        old = self._active.get(key)
        self._active[key] = loaded
        if not swap_id.startswith(DESIRED_SWAP):
            self._swaps[key] = self._swaps.get(key, 0) + 1
        switch_us = (time.perf_counter_ns() - start) / 1000
        # From when requests meet it: the scheduled instant (no lookup since saw the old
        # version), or now.
        self.switched_at_us = at_us
        self._pending.pop(key, None)
        self._retained.pop(loaded.spec.version_id, None)
        if old is not None and old is not loaded:
            self._retain(old)
        log.info("swapped %s to version %d in %.1f us", key, loaded.spec.number, switch_us)
        self.changes.notify()
        return switch_us

    def abort_all(self) -> None:
        """Drops every prepared-but-uncommitted swap (their coordinator is gone)."""
        self._preparing.clear()
        # A scheduled switch is past its commit point: it happens now rather than never.
        self._switch_due(everything=True)
        self._switched.clear()
        self._graveyard.extend(self._prepared.values())
        self._prepared.clear()

    def abort(self, swap_id: str) -> None:
        self._preparing.discard(swap_id)
        self._due.pop(swap_id, None)
        dropped = self._prepared.pop(swap_id, None)
        if dropped is not None:
            self._graveyard.append(dropped)

    def _retain(self, loaded: LoadedPipeline) -> None:
        key = f"{loaded.spec.workspace}/{loaded.spec.pipeline}"
        # Only the last `retain_versions` versions swapped out are kept per pipeline: rollback
        # to them is instant and their sessions serve new versions of the same models, while a
        # stream of swaps cannot pile sessions up.
        same = [
            v
            for v, (p, _) in self._retained.items()
            if f"{p.spec.workspace}/{p.spec.pipeline}" == key
        ]
        keep = max(self._retain_versions - 1, 0)
        for version_id in same[: len(same) - keep]:
            older, _ = self._retained.pop(version_id)
            self._graveyard.append(older)
        if self._retain_seconds <= 0 or self._retain_versions <= 0:
            self._graveyard.append(loaded)
        else:
            expires = time.monotonic() + self._retain_seconds
            self._retained[loaded.spec.version_id] = (loaded, expires)
            # Without further swaps nothing else would call _expire: free it on time.
            asyncio.get_running_loop().call_later(self._retain_seconds, self._expire)
        self._expire()

    def _expire(self) -> None:
        now = time.monotonic()
        for version_id, (loaded, expires) in list(self._retained.items()):
            if expires <= now:
                del self._retained[version_id]
                self._graveyard.append(loaded)

    # -- desired state (level-triggered) ------------------------------------------------

    def swaps_seen(self) -> dict[str, int]:
        """How many swaps each pipeline has committed so far (`reconcile`'s `seen`)."""
        return dict(self._swaps)

    def serves_all(self, desired: list[VersionRef]) -> bool:
        """Whether every version of `desired` is active already, so applying it loads
        nothing (the desired state that follows each commit)."""
        for ref in desired:
            active = self._active.get(ref.key)
            if active is None or active.spec.version_id != ref.version_id:
                return False
        return True

    async def reconcile(
        self, desired: list[VersionRef], seen: dict[str, int] | None = None
    ) -> None:
        """Makes the active set match `desired`: loads what is missing, releases the rest.

        `seen` is `swaps_seen()` when the desired state arrived. A pipeline that a swap
        committed since then keeps the swap's version: the swap is newer than this desired
        state (every state queued after the commit lists it; one that matches what the
        engine runs is not sent at all), and restoring the older version would break
        read-your-writes.
        """
        seen = self.swaps_seen() if seen is None else seen
        async with self._reconcile_lock:
            wanted = {ref.key: ref for ref in desired}

            def swapped_since(key: str) -> bool:
                return self._swaps.get(key, 0) != seen.get(key, 0)

            for key in [k for k in self._active if k not in wanted and not swapped_since(k)]:
                released = self._active.pop(key)
                self._graveyard.append(released)
                log.info("released %s version %d", key, released.spec.number)
            for version_id, (loaded, _) in list(self._retained.items()):
                key = f"{loaded.spec.workspace}/{loaded.spec.pipeline}"
                if key not in wanted and not swapped_since(key):
                    del self._retained[version_id]
                    self._graveyard.append(loaded)
            for key in [k for k in self._pending if k not in wanted]:
                del self._pending[key]
            # Everything still to load is marked first, so readiness never sees a moment
            # where one pipeline is done and the next not yet marked.
            for ref in desired:
                active = self._active.get(ref.key)
                if active is None or active.spec.version_id != ref.version_id:
                    self._pending.setdefault(ref.key, "Loading")
            self.synced = True
            self.changes.notify()
            for ref in desired:
                active = self._active.get(ref.key)
                current = active is not None and active.spec.version_id == ref.version_id
                if current or swapped_since(ref.key):
                    self._pending.pop(ref.key, None)
                    continue
                self._pending[ref.key] = "Loading"
                try:
                    loaded, _ = await self._build(ref)
                except PrepareError as exc:
                    log.error("could not load %s version %d: %s", ref.key, ref.number, exc)
                    self._pending[ref.key] = str(exc)
                    self.changes.notify()
                    continue
                if ref.key in self._pending:  # not released while loading
                    swap_id = f"{DESIRED_SWAP}{ref.version_id}"
                    self._prepared[swap_id] = loaded
                    self.commit(swap_id)

    # -- release ----------------------------------------------------------------------------

    async def reap(self) -> int:
        """Frees, on a worker thread, every retired version no request holds any more.

        Returns how many were freed.
        """
        holder: list[LoadedPipeline] = []
        for i in range(len(self._graveyard) - 1, -1, -1):
            # 2 = the graveyard's reference + getrefcount's argument: nobody else holds it.
            if sys.getrefcount(self._graveyard[i]) == 2:
                holder.append(self._graveyard.pop(i))
        freed = len(holder)
        if holder:
            await asyncio.get_running_loop().run_in_executor(self._builder, _free, holder)
        return freed

    async def reap_forever(self, interval: float = 0.5) -> None:
        while True:
            await asyncio.sleep(interval)
            freed = await self.reap()
            if freed:
                log.info("released %d retired pipeline version(s)", freed)

    def close(self) -> None:
        self._builder.shutdown(wait=False, cancel_futures=True)

    def loaded_versions(self) -> list[LoadedPipeline]:
        """Every version held in memory: active, prepared and retained (for metrics; safe to
        call from another thread)."""
        held = [*list(self._active.values()), *list(self._prepared.values())]
        held += [loaded for loaded, _ in list(self._retained.values())]
        return list({id(p): p for p in held}.values())

    def states(self) -> list[PipelineState]:
        keys = sorted(set(self._active) | set(self._pending))
        out = []
        for key in keys:
            pending = self._pending.get(key)
            if pending is None:
                out.append(PipelineState(key, self._active[key], "Running", ""))
            elif pending == "Loading":
                out.append(PipelineState(key, self._active.get(key), "Loading", ""))
            else:
                out.append(PipelineState(key, self._active.get(key), "Error", pending))
        return out


def _models_shape(spec: PipelineSpec) -> tuple[Any, ...]:
    """What two versions must share to share sessions without a warm-up: the models of
    every step and split, in place (not the weights)."""
    return (
        tuple(step.sha256 for step in spec.steps),
        tuple((s.step, s.kind, tuple(m.sha256 for m in s.models)) for s in spec.splits),
    )
