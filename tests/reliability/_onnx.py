"""Hand-made hostile ONNX files for the reliability tests."""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def _model(nodes: list[Any], initializers: list[Any] | None = None, domain: str = "") -> bytes:
    graph = helper.make_graph(
        nodes,
        "hostile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])],
        initializer=initializers or [],
    )
    opsets = [helper.make_opsetid("", 15)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _external_weight(location: str) -> TensorProto:
    """A one-float tensor `w` whose bytes live in an external file at `location`."""
    weight = numpy_helper.from_array(np.ones((1,), np.float32), "w")
    weight.data_location = TensorProto.EXTERNAL
    weight.ClearField("raw_data")
    for key, value in (("location", location), ("length", "4")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    return weight


def external_data(location: str) -> bytes:
    """y = x * w, where w's bytes live in an external file at `location`."""
    weight = _external_weight(location)
    return _model([helper.make_node("Mul", ["x", "w"], ["y"])], [weight])


def unknown_operator() -> bytes:
    """Valid protobuf, valid graph shape, but an operator no runtime has."""
    return _model([helper.make_node("NoSuchOperator", ["x"], ["y"])])


def custom_domain() -> bytes:
    """An operator from a custom-op domain this runtime does not have."""
    return _model(
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example.custom")],
        domain="com.example.custom",
    )


def external_in_function_default(location: str) -> bytes:
    """A local function whose Constant takes its value from the function's attribute default,
    and that default keeps its bytes in an external file at `location`."""
    from onnx import AttributeProto, FunctionProto

    weight = _external_weight(location)
    constant = helper.make_node("Constant", [], ["c"])
    ref = AttributeProto(name="value", ref_attr_name="w", type=AttributeProto.TENSOR)
    constant.attribute.append(ref)
    function = FunctionProto(
        name="Scale",
        domain="local",
        input=["a"],
        output=["b"],
        node=[constant, helper.make_node("Mul", ["a", "c"], ["b"])],
        opset_import=[helper.make_opsetid("", 15)],
    )
    default = AttributeProto(name="w", type=AttributeProto.TENSOR, t=weight)
    function.attribute_proto.append(default)
    graph = helper.make_graph(
        [helper.make_node("Scale", ["x"], ["y"], domain="local")],
        "hostile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 15), helper.make_opsetid("local", 1)],
        functions=[function],
    )
    model.ir_version = 8
    return bytes(model.SerializeToString())
