"""The status board and the endpoints list, from a real store and fleet (no network): an
engine is listed only while it reports the deployed version."""

from __future__ import annotations

from pathlib import Path

from hotswap.control.domain import TensorSpec
from hotswap.control.fleet import Fleet
from hotswap.control.status import StatusBoard
from hotswap.control.store import Store
from hotswap.v1 import fleet_pb2 as f


def _report(version_id: str, number: int, state: str = "Running") -> f.EngineMessage:
    serving = f.ServingPipeline(
        workspace="ws", pipeline="p", version_id=version_id, number=number, state=state
    )
    return f.EngineMessage(state=f.StateReport(serving=[serving]))


async def test_endpoints_list_only_engines_that_serve_the_deployed_version(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "db")
    store.create_workspace("ws")
    store.create_pipeline("ws", "p")
    spec = (TensorSpec("x", "tensor(float)", (-1, 1)),)
    store.add_model_version("ws", "m", "a" * 64, 1, spec, spec)
    v1 = store.create_pipeline_version("ws", "p", [("m", "")])
    v2 = store.create_pipeline_version("ws", "p", [("m", "")])
    fleet = Fleet(lost_after=5.0)
    board = StatusBoard(store, fleet, {})
    assert board.status("ws", "p").status == "Undeployed"

    store.set_deployment(v2, 3, ["e1", "e2", "e3"])
    e1 = fleet.connect(f.Hello(name="e1", address="127.0.0.1:1"))
    e2 = fleet.connect(f.Hello(name="e2", address="127.0.0.1:2"))
    fleet.handle(e1, _report(v2.version_id, 2))
    fleet.handle(e2, _report(v1.version_id, 1))  # still on the old version
    number, addresses = board.endpoints("ws", "p")
    assert (number, addresses) == (2, ["127.0.0.1:1"])
    status = board.status("ws", "p")
    assert status.status == "Starting"
    assert [(e.name, e.status) for e in status.engines] == [
        ("e1", "Running"),
        ("e2", "Starting"),
        ("e3", "Lost"),
    ]
    fleet.handle(e2, _report(v2.version_id, 2, state="Error"))
    assert board.status("ws", "p").status == "Error"
    fleet.handle(e2, _report(v2.version_id, 2))
    fleet.disconnect(e1)  # a lost engine is never an endpoint
    assert board.endpoints("ws", "p") == (2, ["127.0.0.1:2"])
    store.close()
