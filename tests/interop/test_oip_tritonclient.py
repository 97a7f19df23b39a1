"""The Open Inference Protocol on the engine, through tritonclient: a client nobody here wrote.

tritonclient runs in a child process (see `_triton_driver`); these tests assert on what it saw.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from tests.e2e import _api
from tests.interop._triton import Triton, TritonError
from tests.interop.conftest import PIPELINE, Deployed

MODELS = ("rf", "gbr", "xgb")


def test_readiness_metadata_and_repository_index(deployed: Deployed, triton: Triton) -> None:
    assert triton.call("is_server_live") is True
    assert triton.call("is_server_ready") is True
    assert triton.call("is_model_ready", model_name=PIPELINE) is True
    assert triton.call("is_model_ready", model_name=PIPELINE, model_version="1") is True
    assert triton.call("is_model_ready", model_name=PIPELINE, model_version="2") is False
    assert triton.call("is_model_ready", model_name="nope") is False

    server = triton.call("get_server_metadata")
    assert server["name"] == "hotswap"
    assert "model_repository" in server["extensions"]

    meta = triton.call("get_model_metadata", model_name=PIPELINE)
    assert meta["name"] == PIPELINE
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    # JSON renders int64 as strings.
    assert meta["inputs"] == [{"name": "float_input", "datatype": "FP32", "shape": ["-1", "18"]}]
    assert [(o["name"], o["datatype"]) for o in meta["outputs"]] == [("variable", "FP32")]

    index = triton.call("get_model_repository_index")
    assert index["models"] == [{"name": PIPELINE, "version": "1", "state": "READY"}]


def test_xgb_metadata_names_its_own_input(deployed: Deployed, triton: Triton) -> None:
    _api.deploy(deployed.control, PIPELINE, deployed.versions["xgb"])
    meta = triton.call("get_model_metadata", model_name=PIPELINE)
    assert meta["versions"] == [str(deployed.versions["xgb"])]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "18"]}]


def test_infer_gives_the_same_numbers_as_engine_infer_and_onnx_runtime(
    deployed: Deployed, triton: Triton, assets: Path, xtest_rows: np.ndarray
) -> None:
    engine = _api.engine(deployed.engine)
    body = _api.ipc_stream(_api.tensor_table(xtest_rows))
    for model in MODELS:
        version = deployed.versions[model]
        _api.deploy(deployed.control, PIPELINE, version)
        expected = _api.reference(assets / "models" / f"{model}_model.onnx", xtest_rows)

        # Whatever the tensor is called: the pipeline has one input.
        answer = triton.send("infer", model=PIPELINE, x=xtest_rows.tolist(), name="x", id="r1")
        assert answer["model_name"] == PIPELINE
        assert answer["model_version"] == str(version)
        assert answer["id"] == "r1"
        assert answer["parameters"]["workspace"] == {"string_param": _api.WS}
        assert answer["shapes"] == {"variable": [len(xtest_rows), 1]}
        got = np.asarray(answer["outputs"]["variable"], dtype=np.float32)
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(got, _api.infer(engine, PIPELINE, body).outputs())


def test_infer_with_version_and_workspace_parameter(deployed: Deployed, triton: Triton) -> None:
    x = np.ones((2, 18), dtype=np.float32).tolist()
    answer = triton.send("infer", model=PIPELINE, x=x, version="1", parameters={"workspace": "ws"})
    assert answer["model_version"] == "1"
    with pytest.raises(TritonError) as wrong_version:
        triton.send("infer", model=PIPELINE, x=x, version="2")
    assert wrong_version.value.status == "StatusCode.NOT_FOUND"
    assert "serves version 1" in wrong_version.value.message


def test_unknown_model_and_bad_input_are_errors_a_person_can_act_on(
    deployed: Deployed, triton: Triton
) -> None:
    with pytest.raises(TritonError) as unknown:
        triton.send("infer", model="nope", x=np.ones((1, 18)).tolist())
    assert unknown.value.status == "StatusCode.NOT_FOUND"
    assert "does not serve pipeline 'nope'" in unknown.value.message
    with pytest.raises(TritonError) as metadata:
        triton.call("get_model_metadata", model_name="nope")
    assert metadata.value.status == "StatusCode.NOT_FOUND"
    with pytest.raises(TritonError) as narrow:
        triton.send("infer", model=PIPELINE, x=np.ones((1, 17)).tolist())
    assert narrow.value.status == "StatusCode.INVALID_ARGUMENT"
    assert "17 values per row" in narrow.value.message
    assert "expects 18" in narrow.value.message


def test_hot_swaps_under_tritonclient_load_fail_nothing(
    deployed: Deployed, triton: Triton, assets: Path, xtest_rows: np.ndarray
) -> None:
    rows = xtest_rows[:2]
    expected = {
        str(deployed.versions[m]): _api.reference(assets / "models" / f"{m}_model.onnx", rows)
        for m in MODELS
    }
    triton.send("load", model=PIPELINE, x=rows.tolist(), threads=2)
    order = ["gbr", "xgb", "rf", "gbr", "xgb"]
    last = str(deployed.versions[order[-1]])
    started = time.monotonic()
    for model in order:
        _api.deploy(deployed.control, PIPELINE, deployed.versions[model])
    # Load goes on until the last version has answered and at least ~2 s have passed (the
    # swaps take about one); each poll is a round trip to the driver, not a blind sleep.
    while last not in triton.send("seen") or time.monotonic() < started + 2.0:
        assert time.monotonic() < started + 15, "the last version never answered"
    seen = triton.send("stop")

    assert seen["error_count"] == 0, seen["errors"]
    assert seen["requests"] > 0
    # Every answer is the number of the version that says it served it.
    for version, by_row in seen["answers"].items():
        for row, values in by_row.items():
            assert values == [float(expected[version][int(row), 0])], (version, row)
    # And traffic really crossed the swaps: the first version and the last both answered.
    assert {str(deployed.versions["rf"]), last} <= set(seen["answers"])
