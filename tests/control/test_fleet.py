"""The fleet registry without a network: names bound to instances, bounded outboxes, blob
scopes, applied revisions, forgetting engines gone for good."""

from __future__ import annotations

import asyncio

import pytest

from hotswap.control.domain import ModelVersion, PipelineVersion
from hotswap.control.engine_port import EngineGone
from hotswap.control.fleet import OUTBOX_LIMIT, EngineConnection, EngineRefused, Fleet
from hotswap.v1 import fleet_pb2 as f


def _fleet(forget_after: float = 3600.0) -> Fleet:
    return Fleet(lost_after=5.0, forget_after=forget_after)


def _hello(name: str, instance: str) -> f.Hello:
    return f.Hello(name=name, address="127.0.0.1:1", instance_id=instance)


def _version(sha: str) -> PipelineVersion:
    model = ModelVersion("ws", "m", "mv", sha, 1, (), (), 0)
    return PipelineVersion("ws", "p", "id", 1, (model,), 0)


async def test_a_live_name_is_not_taken_by_another_instance() -> None:
    fleet = _fleet()
    live = fleet.connect(_hello("e1", "a"), principal="fleet")
    with pytest.raises(EngineRefused, match="in use by another live engine"):
        fleet.connect(_hello("e1", "b"), principal="fleet")
    # The same instance id under another credential is not the same engine either.
    with pytest.raises(EngineRefused):
        fleet.connect(_hello("e1", "a"), principal="other")
    assert live.connected and fleet.connections["e1"] is live
    # The same instance reconnecting replaces its own stale stream.
    again = fleet.connect(_hello("e1", "a"), principal="fleet")
    assert not live.connected and fleet.connections["e1"] is again
    # Once the holder is gone, a new instance may have the name.
    fleet.disconnect(again)
    assert fleet.connect(_hello("e1", "b"), principal="fleet").connected


async def test_an_engine_that_stops_reading_is_disconnected_not_buffered() -> None:
    fleet = _fleet()
    connection = fleet.connect(_hello("e1", "a"))
    for revision in range(OUTBOX_LIMIT + 10):
        fleet.push_desired("e1", [], revision)
    assert not connection.connected
    assert connection.outbox.qsize() == 1  # only the end-of-stream marker is left


async def test_blobs_an_engine_may_fetch_follow_its_desired_state_and_prepares() -> None:
    fleet = _fleet()
    connection = fleet.connect(_hello("e1", "a"))
    sha = "1" * 64
    assert not connection.may_fetch(sha)
    preparing = asyncio.ensure_future(fleet.prepare("e1", "s", _version(sha), "", 10))
    await asyncio.sleep(0)
    assert connection.may_fetch(sha)
    fleet.abort("e1", "s", "test", "")
    assert not connection.may_fetch(sha)
    fleet.push_desired("e1", [_version(sha)], 1)
    assert connection.may_fetch(sha) and not connection.may_fetch("2" * 64)
    fleet.disconnect(connection)
    with pytest.raises(EngineGone):
        await preparing


async def test_waiters_see_an_applied_revision_or_a_disconnect() -> None:
    fleet = _fleet()
    connection = fleet.connect(_hello("e1", "a"))
    waiting = asyncio.ensure_future(fleet.wait_applied("e1", 7, timeout=5))
    await asyncio.sleep(0)
    fleet.handle(connection, f.EngineMessage(state=f.StateReport(revision=6)))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    fleet.handle(connection, f.EngineMessage(state=f.StateReport(revision=7)))
    assert await waiting is True
    assert await fleet.wait_applied("e1", 8, timeout=0.05) is False  # a timeout is an answer
    late = asyncio.ensure_future(fleet.wait_applied("e1", 9, timeout=5))
    await asyncio.sleep(0)
    fleet.disconnect(connection)
    assert await late is False  # woken by the disconnect, not by the timeout


async def test_engines_gone_for_good_are_forgotten_unless_kept() -> None:
    fleet = _fleet(forget_after=0.0)
    for name in ("gone", "assigned", "live"):
        fleet.connect(_hello(name, name))
    fleet.disconnect(fleet.connections["gone"])
    fleet.disconnect(fleet.connections["assigned"])
    assert fleet.forget_gone(keep={"assigned"}.__contains__) == ["gone"]
    assert sorted(fleet.connections) == ["assigned", "live"]


def _next(connection: EngineConnection) -> f.ControlMessage:
    message = connection.outbox.get_nowait()
    assert message is not None
    return message


def _running(version: PipelineVersion) -> f.ServingPipeline:
    return f.ServingPipeline(
        workspace=version.workspace, pipeline=version.pipeline, version_id=version.version_id,
        number=version.number, pipeline_state=f.PIPELINE_STATE_RUNNING,
    )  # fmt: skip


async def test_a_commit_answer_carries_what_the_engine_serves() -> None:
    """The engine's state rides on its commit answer: known by the time commit() returns,
    and the desired state that follows a commit is not sent to an engine that runs it."""
    fleet = _fleet()
    connection = fleet.connect(_hello("e1", "a"))
    assert _next(connection).WhichOneof("kind") == "access"  # sent on connect
    version = _version("1" * 64)
    committing = asyncio.ensure_future(fleet.commit("e1", "s", "", timeout=5))
    await asyncio.sleep(0)
    assert _next(connection).WhichOneof("kind") == "commit"
    answer = f.CommitResult(swap_id="s", ok=True, state=f.StateReport(serving=[_running(version)]))
    fleet.handle(connection, f.EngineMessage(committed=answer))
    await committing
    assert connection.serving["ws/p"].version_id == "id"

    fleet.push_desired("e1", [version], 3, unless_served=True)
    assert connection.outbox.empty()  # runs it already: nothing to send
    assert connection.may_fetch("1" * 64)  # what it may fetch follows the desired state
    other = PipelineVersion("ws", "p", "id2", 2, version.steps, 0)
    fleet.push_desired("e1", [other], 4, unless_served=True)
    assert _next(connection).desired.revision == 4  # runs another: sent
    fleet.push_desired("e1", [], 5, unless_served=True)  # must release it: sent
    assert _next(connection).desired.revision == 5
    fleet.push_desired("e1", [version], 6)  # without the flag, always sent (reconnects)
    assert _next(connection).desired.revision == 6
