"""The Open Inference Protocol's REST binding on the engine's HTTP port, through
tritonclient.http (a REST client nobody here wrote): the tutorial's numbers, in JSON and in
the binary data extension tritonclient sends by default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.e2e import _api
from tests.interop.conftest import PIPELINE, Deployed

http_client: Any = pytest.importorskip(
    "tritonclient.http", reason="tritonclient[http] (a dev dependency) is not installed"
)
from tritonclient.utils import InferenceServerException  # type: ignore[import-untyped]  # noqa: E402

MODELS = ("rf", "gbr", "xgb")


@pytest.fixture
def client(deployed: Deployed) -> Any:
    triton = http_client.InferenceServerClient(url=deployed.stack.http_address("engine-1"))
    yield triton
    triton.close()


def _infer(client: Any, x: np.ndarray, binary: bool) -> Any:
    tensor = http_client.InferInput("float_input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    wanted = [http_client.InferRequestedOutput("variable", binary_data=binary)]
    return client.infer(PIPELINE, [tensor], outputs=wanted, request_id="r1")


def test_readiness_and_metadata(deployed: Deployed, client: Any) -> None:
    assert client.is_server_live() is True
    assert client.is_server_ready() is True
    assert client.is_model_ready(PIPELINE) is True
    assert client.is_model_ready(PIPELINE, "1") is True
    assert client.is_model_ready(PIPELINE, "2") is False
    assert client.is_model_ready("nope") is False
    assert client.get_server_metadata()["name"] == "hotswap"
    meta = client.get_model_metadata(PIPELINE)
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "float_input", "datatype": "FP32", "shape": [-1, 18]}]
    assert [(o["name"], o["datatype"]) for o in meta["outputs"]] == [("variable", "FP32")]


def test_the_tutorials_numbers_in_json_and_binary(
    deployed: Deployed, client: Any, assets: Path, xtest_rows: np.ndarray
) -> None:
    engine = _api.engine(deployed.engine)
    body = _api.ipc_stream(_api.tensor_table(xtest_rows))
    for model in MODELS:
        version = deployed.versions[model]
        _api.deploy(deployed.control, PIPELINE, version)
        expected = _api.reference(assets / "models" / f"{model}_model.onnx", xtest_rows)
        np.testing.assert_array_equal(expected, _api.infer(engine, PIPELINE, body).outputs())
        for binary in (True, False):
            result = _infer(client, xtest_rows, binary)
            response = result.get_response()
            assert response["model_version"] == str(version)
            assert response["id"] == "r1"
            assert response["parameters"]["workspace"] == _api.WS
            got = result.as_numpy("variable")
            assert got.shape == (len(xtest_rows), 1)
            # JSON carries float32 values exactly (as doubles); binary carries their bytes.
            np.testing.assert_array_equal(got.astype(np.float32), expected)


def test_errors_are_ones_a_person_can_act_on(deployed: Deployed, client: Any) -> None:
    with pytest.raises(InferenceServerException) as missing:
        client.infer("nope", [http_client.InferInput("x", [1, 18], "FP32")])
    assert "nope" in missing.value.message()
    wide = np.ones((1, 19), np.float32)
    with pytest.raises(InferenceServerException) as bad:
        _infer(client, wide, True)
    assert "19" in bad.value.message()
    assert "18" in bad.value.message()
    assert client.is_server_ready() is True  # nothing lost: it serves on
    assert _infer(client, np.ones((1, 18), np.float32), True).as_numpy("variable").shape == (1, 1)
