"""The swap coordinator against plain Python engines that implement its `EnginePort` (no grpc,
no processes), driven by a Hypothesis state machine through random interleavings of deploys,
prepare failures and timeouts, lost commit answers, disconnects, reconnects, drains and
control-plane restarts, over a real SQLite store.

Invariants checked after every step:
- one deploy commits at most one version: the store holds the target or what it held before;
- a failed swap changes nothing that serves, on any engine, nor in the store;
- read-your-writes: after a deploy returns, every engine it does not name as unconfirmed
  serves the new version;
- a drain answers the engine with exactly what it still holds, and a drained engine that
  holds nothing serves nothing; no deploy places replicas on a draining engine;
- the desired state converges once engines are reachable (`settle`).
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hotswap.control.coordinator import DeployResult, SwapCoordinator
from hotswap.control.domain import PipelineVersion, TensorSpec
from hotswap.control.engine_port import (
    CommitDone,
    EngineGone,
    EngineRef,
    EngineRefusedSwap,
    PrepareDone,
)
from hotswap.control.errors import DeployConflict, DeployFailed, NoEngines
from hotswap.control.store import Store

ENGINES = ("e1", "e2", "e3")
MODES = ("ok", "fail_prepare", "timeout_prepare", "lose_commit_answer", "gone_at_commit")
KEY = "ws/p"


@dataclass
class PlainEngine:
    """One engine as the coordinator sees it through the port."""

    name: str
    connected: bool = True
    mode: str = "ok"
    serving: dict[str, int] = field(default_factory=dict)  # pipeline key -> version number
    prepared: dict[str, PipelineVersion] = field(default_factory=dict)
    applied: int = 0
    draining: bool = False
    kept: list[str] | None = None  # the DrainDone answer, once given


class PlainEngines:
    """An `EnginePort` of in-process engines whose behaviour the test sets."""

    lost_after = 5.0

    def __init__(self) -> None:
        self.engines = {name: PlainEngine(name) for name in ENGINES}

    def _reachable(self, name: str) -> PlainEngine:
        engine = self.engines[name]
        if not engine.connected:
            raise EngineGone(f"engine {name} is not connected")
        return engine

    def live(self) -> list[EngineRef]:
        return [
            EngineRef(n, f"{n}:1", draining=e.draining)
            for n, e in sorted(self.engines.items())
            if e.connected
        ]

    def known(self, name: str) -> bool:
        return name in self.engines

    def address_of(self, name: str) -> str:
        return f"{name}:1"

    async def prepare(
        self, engine: str, swap_id: str, version: PipelineVersion, request_id: str, timeout: float
    ) -> PrepareDone:
        found = self._reachable(engine)
        if found.mode == "fail_prepare":
            raise EngineRefusedSwap("the model does not fit")
        if found.mode == "timeout_prepare":
            raise TimeoutError
        found.prepared[swap_id] = version
        return PrepareDone(1.0, 1.0, 1.0, reused=False)

    async def commit(
        self, engine: str, swap_id: str, request_id: str, timeout: float, switch_at_us: int = 0
    ) -> CommitDone:
        found = self._reachable(engine)
        version = found.prepared.pop(swap_id)
        if found.mode == "gone_at_commit":
            found.connected = False  # gone before it switched
            raise EngineGone(f"engine {engine} disconnected")
        found.serving[version.key] = version.number
        if found.mode == "lose_commit_answer":
            raise TimeoutError  # it switched; the answer never arrived
        return CommitDone(1.0)

    def abort(self, engine: str, swap_id: str, reason: str, request_id: str) -> None:
        self.engines[engine].prepared.pop(swap_id, None)

    def push_desired(
        self,
        engine: str,
        versions: Sequence[PipelineVersion],
        revision: int,
        unless_served: bool = False,
    ) -> None:
        found = self.engines[engine]
        wanted = {v.key: v.number for v in versions}
        if unless_served and found.connected and found.serving == wanted:
            return  # not sent: its revision stays where it was, as the fleet's does
        if found.connected:  # applied at once: the engine serves exactly what is desired
            found.serving = wanted
            found.applied = max(found.applied, revision)

    async def wait_applied(self, engine: str, revision: int, timeout: float) -> bool:
        found = self.engines[engine]
        return found.connected and found.applied >= revision

    def drained(self, engine: str, kept: Sequence[str]) -> None:
        if self.engines[engine].connected:
            self.engines[engine].kept = list(kept)


class CoordinatorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="coordinator-model-"))
        self.port = PlainEngines()
        self.store = Store(self.dir / "db")
        self.store.create_workspace("ws")
        self.store.create_pipeline("ws", "p")
        spec = (TensorSpec("x", "tensor(float)", (-1, 1)),)
        for i in range(3):
            self.store.add_model_version("ws", f"m{i}", f"{i}" * 64, 1, spec, spec)
        self.versions = [
            self.store.create_pipeline_version("ws", "p", [(f"m{i}", "")]).number for i in range(3)
        ]
        self.coordinator = self._coordinator()

    def _coordinator(self) -> SwapCoordinator:
        return SwapCoordinator(self.store, self.port, prepare_timeout=0.01, commit_timeout=0.01)

    def _run(self, coroutine: object) -> object:
        return self.loop.run_until_complete(coroutine)  # type: ignore[arg-type]

    def _connected(self, engine: str) -> None:
        """What the Fleet servicer does on a Hello, inside the loop as in production."""

        async def connect() -> None:
            self.coordinator.engine_connected(engine)

        self._run(connect())

    def _deployed(self) -> int:
        deployment = self.store.get_pipeline("ws", "p").deployment
        return deployment.version.number if deployment else 0

    def teardown(self) -> None:
        self._run(self.coordinator.close())
        self.loop.close()
        self.store.close()

    @rule(engine=st.sampled_from(ENGINES), mode=st.sampled_from(MODES))
    def behave(self, engine: str, mode: str) -> None:
        self.port.engines[engine].mode = mode

    @rule(index=st.integers(0, 2), replicas=st.integers(0, 3))
    def deploy(self, index: int, replicas: int) -> None:
        before_store = self._deployed()
        before = {n: dict(e.serving) for n, e in self.port.engines.items()}
        target = self.versions[index]
        try:
            result = self._run(
                self.coordinator.deploy("ws", "p", target, replicas, expected_current=None)
            )
        except (DeployFailed, NoEngines, DeployConflict):
            # A failed swap changes nothing that serves, anywhere.
            assert self._deployed() == before_store
            assert {n: e.serving for n, e in self.port.engines.items()} == before
            return
        assert isinstance(result, DeployResult)
        # One deploy commits exactly its target.
        assert self._deployed() == target
        # Read-your-writes on every engine the result does not name as unconfirmed.
        for timing in result.engines:
            if timing.engine not in result.unconfirmed:
                assert self.port.engines[timing.engine].serving.get(KEY) == target
            assert not self.port.engines[timing.engine].draining

    @rule(engine=st.sampled_from(ENGINES))
    def drain(self, engine: str) -> None:
        """What the Fleet servicer does on a Drain message, then waits for the answer."""
        found = self.port.engines[engine]
        found.draining, found.kept = True, None

        async def draining() -> None:
            self.coordinator.engine_draining(engine)

        self._run(draining())
        self._drain()
        deployment = self.store.get_pipeline("ws", "p").deployment
        holds = deployment is not None and engine in deployment.engines
        if found.connected:
            assert found.kept == ([KEY] if holds else [])
        if found.connected and not holds:
            assert KEY not in found.serving  # released: its desired state no longer has it

    @rule(engine=st.sampled_from(ENGINES))
    def disconnect(self, engine: str) -> None:
        self.port.engines[engine].connected = False

    @rule(engine=st.sampled_from(ENGINES))
    def reconnect(self, engine: str) -> None:
        self.port.engines[engine].connected = True
        self._connected(engine)
        self._drain()

    @precondition(lambda self: self._deployed() > 0)
    @rule()
    def undeploy(self) -> None:
        unconfirmed = self._run(self.coordinator.undeploy("ws", "p", timeout=0.01))
        assert self._deployed() == 0
        # Reachable engines released it (or are named); the others do when they reconnect.
        for name, engine in self.port.engines.items():
            if engine.connected and name not in unconfirmed:  # type: ignore[operator]
                assert KEY not in engine.serving

    @rule()
    def restart_control_plane(self) -> None:
        self._run(self.coordinator.close())
        self.store.close()
        self.store = Store(self.dir / "db")
        self.coordinator = self._coordinator()
        for name, engine in self.port.engines.items():
            if engine.connected:
                self._connected(name)
        self._drain()

    @rule()
    def settle(self) -> None:
        """Engines reachable and well: the desired state converges."""
        for name, engine in self.port.engines.items():
            # A restarted engine (a new process) drains no more.
            engine.mode, engine.connected, engine.draining = "ok", True, False
            self._connected(name)
        self._drain()
        deployment = self.store.get_pipeline("ws", "p").deployment
        for name, engine in self.port.engines.items():
            if deployment is not None and name in deployment.engines:
                assert engine.serving.get(KEY) == deployment.version.number
            else:
                assert KEY not in engine.serving

    def _drain(self) -> None:
        """Lets background work (replica refills) finish."""
        pending = list(self.coordinator._background)
        if pending:
            self._run(asyncio.wait(pending))

    @invariant()
    def serving_only_versions_that_were_deployed(self) -> None:
        allowed = {0, *self.versions}
        for engine in self.port.engines.values():
            assert engine.serving.get(KEY, 0) in allowed
            assert not engine.prepared or all(
                v.number in self.versions for v in engine.prepared.values()
            )


CoordinatorMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCoordinator = CoordinatorMachine.TestCase
