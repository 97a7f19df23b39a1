"""Drains in the coordinator, over plain Python engines and a real SQLite store: however often
an engine says it drains, one drain runs; a deploy racing the drain does not leave the
pipeline on the drainer."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hotswap.control.coordinator import SwapCoordinator
from hotswap.control.domain import TensorSpec
from hotswap.control.store import Store
from hotswap.control.timeline import SwapTimeline
from tests.control.test_coordinator_model import PlainEngines


def _setup(tmp_path: Path) -> tuple[Store, PlainEngines, SwapCoordinator, SwapTimeline]:
    store = Store(tmp_path / "db")
    store.create_workspace("ws")
    spec = (TensorSpec("x", "tensor(float)", (-1, 1)),)
    for i in range(2):
        store.add_model_version("ws", f"m{i}", f"{i}" * 64, 1, spec, spec)
    for name in ("p", "q"):
        store.create_pipeline("ws", name)
        store.create_pipeline_version("ws", name, [("m0", "")])
        store.create_pipeline_version("ws", name, [("m1", "")])
    port = PlainEngines()
    timeline = SwapTimeline(tmp_path / "db")
    coordinator = SwapCoordinator(
        store, port, prepare_timeout=1, commit_timeout=1, timeline=timeline
    )
    return store, port, coordinator, timeline


async def test_one_drain_however_often_the_engine_says_it(tmp_path: Path) -> None:
    store, port, coordinator, timeline = _setup(tmp_path)
    await coordinator.deploy("ws", "p", 1, 1, None)
    await coordinator.deploy("ws", "q", 1, 3, None)  # on every engine
    drainer = store.get_pipeline("ws", "p").deployment.engines[0]  # type: ignore[union-attr]
    port.engines[drainer].draining = True
    for _ in range(50):
        coordinator.engine_draining(drainer)
    await asyncio.wait(list(coordinator._background))
    for pipeline in ("p", "q"):
        moved = timeline.list("ws", pipeline)
        # One move per pipeline (its first deploy, then the drain's redeploy), not fifty.
        assert [s.kind for s in moved] == ["redeploy", "deploy"]
        engines = store.get_pipeline("ws", pipeline).deployment.engines  # type: ignore[union-attr]
        assert drainer not in engines
    assert port.engines[drainer].kept == []
    await coordinator.close()
    timeline.close()
    store.close()


async def test_a_deploy_racing_the_drain_is_moved_too(tmp_path: Path) -> None:
    store, port, coordinator, timeline = _setup(tmp_path)
    await coordinator.deploy("ws", "p", 1, 1, None)
    drainer = store.get_pipeline("ws", "p").deployment.engines[0]  # type: ignore[union-attr]
    # A user's deploy of version 2 chose its engines before the drain was heard, and holds
    # the pipeline's lock while it prepares on them, the drainer among them.
    racing = asyncio.ensure_future(coordinator.deploy("ws", "p", 2, 1, None))
    await asyncio.sleep(0)  # it has taken the lock and chosen
    port.engines[drainer].draining = True
    coordinator.engine_draining(drainer)
    await racing
    await asyncio.wait(list(coordinator._background))
    deployment = store.get_pipeline("ws", "p").deployment
    assert deployment is not None and deployment.version.number == 2
    assert drainer not in deployment.engines
    assert port.engines[drainer].kept == []
    await coordinator.close()
    timeline.close()
    store.close()
