"""A multi-step pipeline: each step's outputs feed the next step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from hotswap.clients._stack import LocalStack
from tests.e2e import _api
from tests.e2e.conftest import seed_models


def affine_model(scale: float, offset: float) -> bytes:
    """y = x * scale + offset on a [N, 1] float tensor named `x` (a post-processing step)."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "scale"], ["scaled"]),
            helper.make_node("Add", ["scaled", "offset"], ["y"]),
        ],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])],
        initializer=[
            helper.make_tensor("scale", TensorProto.FLOAT, [1], [scale]),
            helper.make_tensor("offset", TensorProto.FLOAT, [1], [offset]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_step_outputs_feed_the_next_step(
    stack: LocalStack, assets: Path, xtest: np.ndarray
) -> None:
    stub = _api.control(stack.control_address)
    seed_models(stub, assets)
    _api.upload(stub, "to-thousands", affine_model(0.001, 0.0))
    _api.upload(stub, "plus-one", affine_model(1.0, 1.0))
    version = _api.new_version(stub, "housing", "rf", "to-thousands", "plus-one")
    _api.deploy(stub, "housing", version.number)

    answer = _api.infer(
        _api.engine(stack.engine_addresses[0]),
        "housing",
        _api.ipc_stream(_api.tensor_table(xtest[:10])),
    )
    assert answer.models == ["rf", "to-thousands", "plus-one"]
    assert answer.table.column_names == ["time", "in.tensor", "out.y", "check_failures"]
    rf = _api.reference(assets / "models" / "rf_model.onnx", xtest[:10])
    expected = (rf * np.float32(0.001)) + np.float32(1.0)
    np.testing.assert_allclose(answer.outputs("out.y"), expected, rtol=1e-6)
