"""Deploy says only what happened: engines that did not confirm are named, a cancelled deploy
aborts everywhere, a replacement engine is prepared before it serves, and undeploy timeouts
are an answer, not UNKNOWN. The engines are scripted protocol peers, so every branch around
the commit point is taken on purpose, not by timing."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import hotswap
from hotswap.clients._stack import LocalStack
from hotswap.v1 import control_pb2 as c
from hotswap.v1 import fleet_pb2 as f
from hotswap.v1 import types_pb2
from tests.e2e import _api
from tests.security._peer import ScriptedEngine


@pytest.fixture
def bare(tmp_path: Path) -> Iterator[LocalStack]:
    """A control plane with no engines of its own (the tests bring scripted ones)."""
    with LocalStack(
        tmp_path / "stack",
        engines=0,
        control_args=(
            "--commit-timeout",
            "1",
            "--lost-after",
            "1",
            "--heartbeat-interval",
            "0.2",
        ),
    ) as stack:
        yield stack


@pytest.fixture
def control(bare: LocalStack, assets: Path) -> Any:
    stub = _api.control(bare.control_address)
    stub.CreateWorkspace(c.CreateWorkspaceRequest(name=_api.WS))
    _api.upload(stub, "rf", (assets / "models" / "rf_model.onnx").read_bytes())
    stub.CreatePipeline(c.CreatePipelineRequest(workspace=_api.WS, name="p"))
    _api.new_version(stub, "p", "rf")
    return stub


@pytest.fixture
def engine(bare: LocalStack) -> Iterator[ScriptedEngine]:
    peer = ScriptedEngine(bare.control_address, "s1").connect()
    peer.next("desired")
    yield peer
    peer.close()


def _serving(version: Any) -> f.ServingPipeline:
    return f.ServingPipeline(
        workspace=version.workspace,
        pipeline=version.pipeline,
        version_id=version.version_id,
        number=version.number,
        state="Running",
    )


def _swap_as_asked(engine: ScriptedEngine) -> f.Prepare:
    """Plays a well-behaved engine through one swap: prepared, switched, reported, confirmed."""
    prepare = engine.next("prepare").prepare
    engine.prepared(prepare.swap_id)
    engine.next("commit")
    engine.report([_serving(prepare.version)])
    engine.send(f.EngineMessage(committed=f.CommitResult(swap_id=prepare.swap_id, ok=True)))
    return prepare


def _deploy_in_background(stub: Any, **kw: Any) -> Any:
    return stub.Deploy.future(
        c.DeployRequest(workspace=_api.WS, pipeline="p", version=1, **kw), timeout=30
    )


def test_engine_that_never_confirms_its_commit_is_named(
    control: Any, engine: ScriptedEngine
) -> None:
    pending = _deploy_in_background(control)
    engine.prepared(engine.next("prepare").prepare.swap_id)
    engine.next("commit")  # and never answer it
    response = pending.result(timeout=30)
    assert list(response.unconfirmed_engines) == ["s1"]
    # It may still serve nothing (or the old version): clients are not sent there.
    assert _api.endpoints(control, "p") == []
    swap = control.ListSwaps(c.ListSwapsRequest(workspace=_api.WS, pipeline="p")).swaps[0]
    assert swap.outcome == "ok" and "s1 did not confirm" in swap.reason
    assert swap.outcome_code == c.SWAP_OUTCOME_OK
    assert [e.stage_code for e in swap.engines] == [c.SWAP_STAGE_FAILED]


def test_engine_that_disconnects_at_commit_is_named(control: Any, engine: ScriptedEngine) -> None:
    pending = _deploy_in_background(control)
    engine.prepared(engine.next("prepare").prepare.swap_id)
    engine.next("commit")
    engine.close()  # gone between the commit point and its answer
    response = pending.result(timeout=30)
    assert list(response.unconfirmed_engines) == ["s1"]
    assert (
        control.GetPipeline(c.GetPipelineRequest(workspace=_api.WS, name="p")).deployed.number == 1
    )


def test_sdk_warns_naming_the_unconfirmed_engine(
    bare: LocalStack, control: Any, engine: ScriptedEngine
) -> None:
    import threading

    def script() -> None:
        engine.prepared(engine.next("prepare").prepare.swap_id)

    helper = threading.Thread(target=script)
    helper.start()
    client = hotswap.Client(bare.control_address)
    client.set_current_workspace(_api.WS)
    pipeline = client.get_pipeline("p")
    with pytest.warns(hotswap.HotswapWarning, match="s1"):
        pipeline.deploy(version=1)
    helper.join()
    assert pipeline.last_deploy() is not None
    assert pipeline.last_deploy().unconfirmed == ("s1",)  # type: ignore[union-attr]


def test_cancelled_deploy_aborts_everywhere(control: Any, engine: ScriptedEngine) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        control.Deploy(c.DeployRequest(workspace=_api.WS, pipeline="p", version=1), timeout=1)
    assert excinfo.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The engine was asked to prepare, never answered; the caller left: it is told to abort.
    asked = engine.next("prepare").prepare.swap_id
    assert engine.next("abort").abort.swap_id == asked
    assert not control.GetPipeline(c.GetPipelineRequest(workspace=_api.WS, name="p")).HasField(
        "deployed"
    )


def test_replacement_engine_is_prepared_before_it_serves(
    bare: LocalStack, control: Any, engine: ScriptedEngine
) -> None:
    pending = _deploy_in_background(control)
    _swap_as_asked(engine)
    assert list(pending.result(timeout=30).unconfirmed_engines) == []
    assert _api.endpoints(control, "p") == ["127.0.0.1:1"]
    engine.close()  # s1 is lost

    spare = ScriptedEngine(bare.control_address, "s2", address="127.0.0.1:2").connect()
    try:
        # The spare gets the deployment through a prepare, not by being told to serve it.
        takeover = _swap_as_asked(spare)
        assert takeover.version.number == 1
        desired = [m for m in list(spare.received.queue) if m.WhichOneof("kind") == "desired"]
        assert all(not d.desired.pipelines for d in desired)
        _api.until(lambda: _api.endpoints(control, "p") == ["127.0.0.1:2"], "the spare to serve")
        swaps = control.ListSwaps(c.ListSwapsRequest(workspace=_api.WS, pipeline="p")).swaps
        assert swaps[0].kind == "redeploy" and "replacing lost engines" in swaps[0].requested_by
    finally:
        spare.close()


def test_undeploy_timeout_is_an_answer_naming_the_engine(
    control: Any, engine: ScriptedEngine
) -> None:
    pending = _deploy_in_background(control)
    _swap_as_asked(engine)
    pending.result(timeout=30)
    # The engine never reports releasing the pipeline.
    response = control.Undeploy(c.UndeployRequest(workspace=_api.WS, pipeline="p"), timeout=30)
    assert list(response.unconfirmed_engines) == ["s1"]


def test_engine_gone_at_commit_converges_when_it_returns(
    bare: LocalStack, control: Any, engine: ScriptedEngine
) -> None:
    pending = _deploy_in_background(control)
    engine.prepared(engine.next("prepare").prepare.swap_id)
    engine.next("commit")
    engine.close()
    assert list(pending.result(timeout=30).unconfirmed_engines) == ["s1"]
    back = ScriptedEngine(bare.control_address, "s1").connect()  # restarted: a new instance
    try:
        desired = back.next("desired").desired
        assert [(v.pipeline, v.number) for v in desired.pipelines] == [("p", 1)]
    finally:
        back.close()


def test_control_plane_killed_after_the_commit_point_keeps_the_new_version(
    bare: LocalStack, control: Any, engine: ScriptedEngine
) -> None:
    pending = _deploy_in_background(control)
    engine.prepared(engine.next("prepare").prepare.swap_id)
    engine.next("commit")  # the store names version 1 from here on
    bare.kill("control", signal.SIGKILL)
    with pytest.raises(grpc.RpcError):
        pending.result(timeout=30)
    bare.start_control()
    stub = _api.control(bare.control_address)
    assert stub.GetPipeline(c.GetPipelineRequest(workspace=_api.WS, name="p")).deployed.number == 1
    swap = stub.ListSwaps(c.ListSwapsRequest(workspace=_api.WS, pipeline="p")).swaps[0]
    assert swap.outcome == "interrupted"
    back = ScriptedEngine(bare.control_address, "s1").connect()
    try:
        desired = back.next("desired").desired
        assert [(v.pipeline, v.number) for v in desired.pipelines] == [("p", 1)]
    finally:
        back.close()


@pytest.mark.parametrize("state_on_answer", [True, False], ids=["reported", "silent"])
def test_the_desired_state_after_a_commit_goes_only_where_it_changes_something(
    control: Any, engine: ScriptedEngine, state_on_answer: bool
) -> None:
    """An engine whose commit answer says it runs the new version gets no copy of the
    desired state after it (two messages a swap per engine saved); one that said nothing
    does."""
    pending = _deploy_in_background(control)
    prepare = engine.next("prepare").prepare
    engine.prepared(prepare.swap_id)
    engine.next("commit")
    answer = f.CommitResult(swap_id=prepare.swap_id, ok=True)
    if state_on_answer:
        answer.state.serving.append(_serving(prepare.version))
    engine.send(f.EngineMessage(committed=answer))
    assert list(pending.result(timeout=30).unconfirmed_engines) == []
    if state_on_answer:  # known from the answer alone: clients are sent there at once
        assert _api.endpoints(control, "p") == ["127.0.0.1:1"]
    # A logs query is queued after everything the deploy sent: what came before it is all.
    logs = control.GetPipelineLogs.future(
        types_pb2.GetLogsRequest(workspace=_api.WS, pipeline="p"), timeout=30
    )
    kinds = []
    while (message := engine.received.get(timeout=10)).WhichOneof("kind") != "logs":
        kinds.append(message.WhichOneof("kind"))
    engine.send(f.EngineMessage(logs=f.LogsResult(query_id=message.logs.query_id, error="no")))
    logs.result(timeout=30)
    assert ("desired" in kinds) is not state_on_answer, kinds
