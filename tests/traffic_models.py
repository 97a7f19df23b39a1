"""ONNX models made for traffic tests: shaped like the tutorial's (18 floats in, `variable`
[N, 1] out), so they can share a split step with rf, gbr and xgb."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FEATURES = 18


def _model(nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto]) -> bytes:
    graph = helper.make_graph(
        nodes,
        "traffic",
        [helper.make_tensor_value_info("float_input", TensorProto.FLOAT, [None, FEATURES])],
        [helper.make_tensor_value_info("variable", TensorProto.FLOAT, [None, 1])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def failing_model() -> bytes:
    """Passes the engine's warm-up (zeros) and fails on real rows: the first feature (the
    tutorial's bedrooms, 1 or more) indexes a one-element table, out of its bounds."""
    return _model(
        [
            helper.make_node("Slice", ["float_input", "zero", "one", "one_axis"], ["first"]),
            helper.make_node("Cast", ["first"], ["index"], to=TensorProto.INT64),
            helper.make_node("Squeeze", ["index", "one_axis"], ["flat"]),
            helper.make_node("Gather", ["table", "flat"], ["variable"], axis=0),
        ],
        [
            numpy_helper.from_array(np.array([0], np.int64), "zero"),
            numpy_helper.from_array(np.array([1], np.int64), "one"),
            numpy_helper.from_array(np.array([1], np.int64), "one_axis"),
            numpy_helper.from_array(np.zeros((1, 1), np.float32), "table"),
        ],
    )


def slow_model(width: int = 384, depth: int = 24) -> bytes:
    """Right-shaped answers, slowly: `depth` [width x width] matrix products a row (one
    shared weight, so the file stays small); ~100x the time of the tutorial's trees."""
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("MatMul", ["float_input", "w_in"], ["h0"])]
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("MatMul", [f"h{depth}", "w_out"], ["variable"]))
    scale = 1 / np.sqrt(width)
    return _model(
        nodes,
        [
            numpy_helper.from_array(
                rng.normal(0, 0.1, (FEATURES, width)).astype(np.float32), "w_in"
            ),
            numpy_helper.from_array(rng.normal(0, scale, (width, width)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.normal(0, 1, (width, 1)).astype(np.float32), "w_out"),
        ],
    )


def narrow_model() -> bytes:
    """Takes 4 features, not 18: it cannot share a split step with the tutorial's models."""
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["variable"], keepdims=1)],
        "narrow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("variable", TensorProto.FLOAT, [None, 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 8
    return model.SerializeToString()
