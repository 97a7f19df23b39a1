"""The fleet registry without a network: names bound to instances, bounded outboxes, blob
scopes, forgetting engines gone for good."""

from __future__ import annotations

import pytest

from hotswap.control.fleet import OUTBOX_LIMIT, EngineRefused, Fleet
from hotswap.v1 import fleet_pb2 as f
from hotswap.v1 import types_pb2 as t


def _fleet(forget_after: float = 3600.0) -> Fleet:
    return Fleet(lambda name: f.DesiredState(), lost_after=5.0, forget_after=forget_after)


def _hello(name: str, instance: str) -> f.Hello:
    return f.Hello(name=name, address="127.0.0.1:1", instance_id=instance)


async def test_a_live_name_is_not_taken_by_another_instance() -> None:
    fleet = _fleet()
    live = fleet.connect(_hello("e1", "a"))
    with pytest.raises(EngineRefused, match="in use by another live engine"):
        fleet.connect(_hello("e1", "b"))
    assert live.connected and fleet.sessions["e1"] is live
    # The same instance reconnecting replaces its own stale stream.
    again = fleet.connect(_hello("e1", "a"))
    assert not live.connected and fleet.sessions["e1"] is again
    # Once the holder is gone, a new instance may have the name.
    fleet.disconnect(again)
    assert fleet.connect(_hello("e1", "b")).connected


async def test_an_engine_that_stops_reading_is_disconnected_not_buffered() -> None:
    fleet = _fleet()
    session = fleet.connect(_hello("e1", "a"))
    beat = f.ControlMessage(heartbeat=f.Heartbeat())
    for _ in range(OUTBOX_LIMIT + 10):
        fleet.send(session, beat)
    assert not session.connected
    assert session.outbox.qsize() == 1  # only the end-of-stream marker is left


async def test_blobs_an_engine_may_fetch_follow_its_desired_state_and_prepares() -> None:
    fleet = _fleet()
    session = fleet.connect(_hello("e1", "a"))
    version = t.PipelineVersion(steps=[t.ModelVersion(sha256="1" * 64)])
    assert not session.may_fetch("1" * 64)
    fleet.send(session, f.ControlMessage(prepare=f.Prepare(swap_id="s", version=version)))
    assert session.may_fetch("1" * 64)
    fleet.send(session, f.ControlMessage(abort=f.Abort(swap_id="s")))
    assert not session.may_fetch("1" * 64)
    fleet.send(session, f.ControlMessage(desired=f.DesiredState(pipelines=[version])))
    assert session.may_fetch("1" * 64) and not session.may_fetch("2" * 64)


async def test_engines_gone_for_good_are_forgotten_unless_kept() -> None:
    fleet = _fleet(forget_after=0.0)
    for name in ("gone", "assigned", "live"):
        fleet.connect(_hello(name, name))
    fleet.disconnect(fleet.sessions["gone"])
    fleet.disconnect(fleet.sessions["assigned"])
    assert fleet.forget_gone(keep={"assigned"}.__contains__) == ["gone"]
    assert sorted(fleet.sessions) == ["assigned", "live"]
