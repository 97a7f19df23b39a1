"""Real processes, really stopped or killed: a failed swap changes nothing, and a restarted
control plane finds everything where it was."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from hotswap.clients._stack import LocalStack
from hotswap.v1 import control_pb2 as c
from tests.e2e import _api
from tests.e2e.conftest import seed_models


def _serves(stack: LocalStack, assets: Path, x: np.ndarray, model: str, version: int) -> None:
    body = _api.ipc_stream(_api.tensor_table(x))
    for address in stack.engine_addresses:
        answer = _api.infer(_api.engine(address), "housing", body)
        assert (answer.version, answer.models) == (version, [model])
        np.testing.assert_array_equal(
            answer.outputs(), _api.reference(assets / "models" / f"{model}_model.onnx", x)
        )


def _status(stub: object) -> c.PipelineStatus:
    return stub.GetPipelineStatus(  # type: ignore[attr-defined,no-any-return]
        c.GetPipelineStatusRequest(workspace=_api.WS, pipeline="housing")
    )


def test_deploy_switches_both_engines(stack2: LocalStack, assets: Path, xtest: np.ndarray) -> None:
    stub = _api.control(stack2.control_address)
    seed_models(stub, assets)
    v1 = _api.new_version(stub, "housing", "rf").number
    first = _api.deploy(stub, "housing", v1, replicas=2)
    assert sorted(e.engine for e in first.engines) == ["engine-1", "engine-2"]
    v2 = _api.new_version(stub, "housing", "gbr").number
    before_us = time.time_ns() // 1000
    swap = _api.deploy(stub, "housing", v2)
    after_us = time.time_ns() // 1000
    assert len(swap.engines) == 2 and all(e.switch_us > 0 for e in swap.engines)
    # Each engine says when it switched (its clock; one machine here): inside the deploy, and
    # the timeline keeps the same instants.
    assert all(before_us < e.switched_at_us < after_us for e in swap.engines)
    recorded = stub.ListSwaps(c.ListSwapsRequest(workspace=_api.WS, pipeline="housing")).swaps[0]
    assert {e.engine: e.switched_at_us for e in recorded.engines} == {
        e.engine: e.switched_at_us for e in swap.engines
    }
    _serves(stack2, assets, xtest[:3], "gbr", v2)
    assert sorted(_api.endpoints(stub, "housing")) == sorted(stack2.engine_addresses)


def test_stalled_engine_aborts_the_swap_everywhere(
    stack2: LocalStack, assets: Path, xtest: np.ndarray
) -> None:
    stub = _api.control(stack2.control_address)
    seed_models(stub, assets)
    v1 = _api.new_version(stub, "housing", "rf").number
    _api.deploy(stub, "housing", v1, replicas=2)
    v2 = _api.new_version(stub, "housing", "gbr").number

    stack2.kill("engine-2", signal.SIGSTOP)
    try:
        with pytest.raises(grpc.RpcError) as failed:
            _api.deploy(stub, "housing", v2)
    finally:
        stack2.kill("engine-2", signal.SIGCONT)
    assert _api.rpc_code(failed) == grpc.StatusCode.FAILED_PRECONDITION
    message = failed.value.details() or ""
    assert "engine-2" in message and "did not prepare" in message
    assert f"version {v1} keeps serving" in message

    # Nothing changed: the deployment, both engines and the status all stay on v1.
    pipeline = stub.GetPipeline(c.GetPipelineRequest(workspace=_api.WS, name="housing"))
    assert pipeline.deployed.number == v1
    _serves(stack2, assets, xtest[:3], "rf", v1)
    # The aborted swap left nothing prepared: the next deploy works on both engines.
    done = _api.deploy(stub, "housing", v2)
    assert len(done.engines) == 2
    _serves(stack2, assets, xtest[:3], "gbr", v2)


def test_engine_killed_mid_prepare_aborts_and_the_survivor_keeps_serving(
    stack2: LocalStack, assets: Path, xtest: np.ndarray
) -> None:
    stub = _api.control(stack2.control_address)
    seed_models(stub, assets)
    v1 = _api.new_version(stub, "housing", "rf").number
    _api.deploy(stub, "housing", v1, replicas=2)
    v2 = _api.new_version(stub, "housing", "xgb").number

    # Stop engine-2 so the prepare is certainly in flight on it, then kill it there.
    stack2.kill("engine-2", signal.SIGSTOP)
    outcome: list[BaseException] = []

    def deploy() -> None:
        try:
            _api.deploy(stub, "housing", v2)
        except grpc.RpcError as exc:
            outcome.append(exc)

    deployer = threading.Thread(target=deploy)
    deployer.start()
    # The engine-1 half of the prepare answers first; wait until it has, via its log.
    _wait_for_log(stack2, "engine-1", f"prepared {_api.WS}/housing v{v2} ")
    stack2.kill("engine-2", signal.SIGKILL)
    deployer.join(timeout=30)
    assert len(outcome) == 1
    error = outcome[0]
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert "engine-2" in error.details()  # type: ignore[attr-defined]
    answer = _api.infer(
        _api.engine(stack2.address_of("engine-1")),
        "housing",
        _api.ipc_stream(_api.tensor_table(xtest[:2])),
    )
    assert answer.version == v1

    # Restarted with the same name and cache, engine-2 rejoins and serves the desired version.
    stack2.start_engine("engine-2")
    stack2.wait_engines_connected(["engine-2"])
    _wait_running(stub)
    _serves(stack2, assets, xtest[:2], "rf", v1)


def _wait_for_log(stack: LocalStack, name: str, needle: str) -> None:
    _api.until(lambda: needle in stack.log_tail(name, 200), f"{needle!r} in {name}'s log")


def _wait_running(stub: object) -> c.PipelineStatus:
    _api.until(lambda: _status(stub).status == "Running", "the pipeline to be Running")
    return _status(stub)


def test_control_plane_killed_and_restarted_loses_nothing(
    stack: LocalStack, assets: Path, xtest: np.ndarray
) -> None:
    stub = _api.control(stack.control_address)
    uploaded = seed_models(stub, assets)
    v1 = _api.new_version(stub, "housing", "rf").number
    v2 = _api.new_version(stub, "housing", "gbr").number
    _api.deploy(stub, "housing", v2)

    stack.kill("control", signal.SIGKILL)
    # Engines keep serving while the control plane is gone.
    _serves(stack, assets, xtest[:4], "gbr", v2)

    stack.start_control()
    stub = _api.control(stack.control_address)
    stack.wait_engines_connected(stack.engine_names)
    models = stub.ListModels(c.ListModelsRequest(workspace=_api.WS)).models
    assert {m.name: m.latest.sha256 for m in models} == {
        name: mv.sha256 for name, mv in uploaded.items()
    }
    versions = stub.ListPipelineVersions(
        c.ListPipelineVersionsRequest(workspace=_api.WS, pipeline="housing")
    ).versions
    assert [v.number for v in versions] == [v1, v2]
    status = _wait_running(stub)
    assert status.deployed.number == v2
    assert [e.serving_version for e in status.engines] == [v2]
    # And the resynced fleet takes new deploys.
    _api.deploy(stub, "housing", v1)
    _serves(stack, assets, xtest[:4], "rf", v1)


def test_a_new_engine_takes_over_from_a_lost_one(tmp_path: Path, assets: Path) -> None:
    with LocalStack(
        tmp_path / "stack",
        engines=1,
        control_args=("--lost-after", "1"),
        engine_args=("--heartbeat-interval", "0.2"),
    ) as stack:
        stub = _api.control(stack.control_address)
        seed_models(stub, assets)
        _api.deploy(stub, "housing", _api.new_version(stub, "housing", "rf").number)
        stack.kill("engine-1", signal.SIGKILL)
        _wait_status(stub, "Error", "engine-1")

        stack.start_engine("engine-9")
        status = _wait_running(stub)
        assert [(e.name, e.serving_version) for e in status.engines] == [("engine-9", 1)]
        assert _api.endpoints(stub, "housing") == [stack.address_of("engine-9")]


def _wait_status(stub: object, wanted: str, engine: str) -> None:
    def reached() -> bool:
        status = _status(stub)
        return status.status == wanted and status.engines[0].name == engine

    _api.until(reached, f"status {wanted} on {engine}")
