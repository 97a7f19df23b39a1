"""The tutorial's flow through raw stubs: upload three models, deploy, infer, hot swap twice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hotswap.clients._stack import LocalStack
from hotswap.v1 import control_pb2 as c
from tests.e2e import _api
from tests.e2e.conftest import MODELS, seed_models


def test_tutorial_flow_matches_in_process_onnx_runtime(
    stack: LocalStack, assets: Path, xtest: np.ndarray
) -> None:
    stub = _api.control(stack.control_address)
    uploaded = seed_models(stub, assets)
    assert uploaded["rf"].inputs[0].name == "float_input"
    assert uploaded["xgb"].inputs[0].name == "input"
    assert list(uploaded["rf"].inputs[0].shape) == [-1, 18]

    one_row = np.asarray(
        json.loads((assets / "data" / "xtest-1.df.json").read_text())[0]["tensor"], np.float32
    ).reshape(1, 18)
    bodies = {
        "1-row": (_api.ipc_stream(_api.tensor_table(one_row)), one_row),
        "1k-rows": ((assets / "data" / "xtest-1k.arrow").read_bytes(), xtest),  # IPC file format
    }
    for number, model in enumerate(MODELS, start=1):
        version = _api.new_version(stub, "housing", model)
        response = _api.deploy(stub, "housing", version.number)
        assert response.version.number == number
        assert [s.name for s in response.version.steps] == [model]
        engine = _api.engine(_api.endpoints(stub, "housing")[0])
        for body, x in bodies.values():
            answer = _api.infer(engine, "housing", body)
            assert answer.version == number
            assert answer.models == [model]
            expected = _api.reference(assets / "models" / f"{model}_model.onnx", x)
            np.testing.assert_array_equal(answer.outputs(), expected)
            assert answer.table.column_names == [
                "time",
                "in.tensor",
                "out.variable",
                "check_failures",
            ]
            meta = answer.table.schema.metadata
            assert meta[b"hotswap.pipeline_version"] == str(number).encode()
            assert json.loads(meta[b"hotswap.models"])[0]["sha256"] == uploaded[model].sha256

    # The three models really differ, so the checks above would catch a stale version.
    finals = {
        m: _api.reference(assets / "models" / f"{m}_model.onnx", one_row)[0, 0] for m in MODELS
    }
    assert len(set(finals.values())) == 3

    status = stub.GetPipelineStatus(
        c.GetPipelineStatusRequest(workspace=_api.WS, pipeline="housing")
    )
    assert status.status == "Running"
    assert [(e.status, e.serving_version) for e in status.engines] == [("Running", 3)]
    assert [m.sha256 for m in status.engines[0].models] == [uploaded["xgb"].sha256]

    stub.Undeploy(c.UndeployRequest(workspace=_api.WS, pipeline="housing"))
    status = stub.GetPipelineStatus(
        c.GetPipelineStatusRequest(workspace=_api.WS, pipeline="housing")
    )
    assert status.status == "Undeployed"


def test_rollback_to_a_retained_version_reuses_its_sessions(
    stack: LocalStack, assets: Path, xtest: np.ndarray
) -> None:
    stub = _api.control(stack.control_address)
    seed_models(stub, assets)
    v1 = _api.new_version(stub, "housing", "rf").number
    v2 = _api.new_version(stub, "housing", "gbr").number
    _api.deploy(stub, "housing", v1)
    _api.deploy(stub, "housing", v2)
    rollback = _api.deploy(stub, "housing", v1)
    assert rollback.previous.number == v2
    assert [e.reused for e in rollback.engines] == [True]
    engine = _api.engine(stack.engine_addresses[0])
    answer = _api.infer(engine, "housing", _api.ipc_stream(_api.tensor_table(xtest[:5])))
    assert answer.version == v1
    np.testing.assert_array_equal(
        answer.outputs(), _api.reference(assets / "models" / "rf_model.onnx", xtest[:5])
    )
