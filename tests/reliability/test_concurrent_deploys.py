"""Concurrent deploys of one pipeline are serialized (none lost, none mixed), and
expected_current_version makes a deploy a compare-and-set."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from hotswap.clients._stack import LocalStack
from hotswap.v1 import control_pb2 as c
from tests.e2e import _api
from tests.e2e.conftest import MODELS, seed_models


def test_concurrent_deploys_are_serialized(stack2: LocalStack, assets: Path) -> None:
    stub = _api.control(stack2.control_address)
    seed_models(stub, assets)
    _api.deploy(stub, "housing", _api.new_version(stub, "housing", "rf").number, replicas=2)
    numbers = [_api.new_version(stub, "housing", MODELS[i % 3]).number for i in range(6)]
    start = threading.Barrier(len(numbers))
    results: dict[int, Any] = {}

    def deploy(number: int) -> None:
        start.wait()
        results[number] = _api.deploy(stub, "housing", number)

    threads = [threading.Thread(target=deploy, args=(n,)) for n in numbers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == numbers, "a deploy was lost"
    # Each deploy saw the one before it: the `previous` links form a single chain.
    previous = sorted(r.previous.number for r in results.values())
    assert len(set(previous)) == len(numbers)
    final = stub.GetPipeline(c.GetPipelineRequest(workspace=_api.WS, name="housing"))
    last = (set(numbers) - set(previous)).pop()
    assert final.deployed.number == last
    body = _api.ipc_stream(_api.tensor_table(np.ones((1, 18), np.float32)))
    for address in stack2.engine_addresses:
        assert _api.infer(_api.engine(address), "housing", body).version == last


def test_expected_current_version_is_a_compare_and_set(stack: LocalStack, assets: Path) -> None:
    stub = _api.control(stack.control_address)
    seed_models(stub, assets)
    v1 = _api.new_version(stub, "housing", "rf").number
    v2 = _api.new_version(stub, "housing", "gbr").number
    v3 = _api.new_version(stub, "housing", "xgb").number
    first = c.DeployRequest(
        workspace=_api.WS, pipeline="housing", version=v1, expected_current_version=0
    )
    assert stub.Deploy(first).version.number == v1
    # Two writers both read v1 as current; only the first to deploy wins.
    stub.Deploy(
        c.DeployRequest(
            workspace=_api.WS, pipeline="housing", version=v2, expected_current_version=v1
        )
    )
    try:
        stub.Deploy(
            c.DeployRequest(
                workspace=_api.WS, pipeline="housing", version=v3, expected_current_version=v1
            )
        )
        raise AssertionError("the stale deploy succeeded")
    except grpc.RpcError as exc:
        error: Any = exc
        assert error.code() == grpc.StatusCode.ABORTED
        assert f"at version {v2}" in error.details()
    final = stub.GetPipeline(c.GetPipelineRequest(workspace=_api.WS, name="housing"))
    assert final.deployed.number == v2
