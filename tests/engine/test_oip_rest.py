"""The OIP REST binding's translation to and from the gRPC messages (no server): JSON and
binary inputs make the same raw tensors; answers go back as JSON data or binary on request;
malformed bodies say what to fix."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from hotswap.engine import oip, oip_rest
from hotswap.engine.errors import InvalidInput
from hotswap.oip import grpc_service_pb2 as pb

X = np.arange(36, dtype=np.float32).reshape(2, 18)


def _json_body(**extra: object) -> bytes:
    tensor = {"name": "x", "shape": [2, 18], "datatype": "FP32", "data": X.tolist()}
    return json.dumps({"inputs": [tensor], **extra}).encode()


def _binary_body() -> tuple[bytes, str]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [2, 18],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": X.nbytes},
                }
            ],
            "outputs": [{"name": "variable", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + X.tobytes(), str(len(header))


def test_json_and_binary_inputs_make_the_same_tensors() -> None:
    from_json = oip_rest.parse_infer(_json_body(id="r1"), None)
    body, length = _binary_body()
    from_binary = oip_rest.parse_infer(body, length)
    for parsed in (from_json, from_binary):
        [(name, values)] = oip.input_tensors(parsed.message)
        assert name == "x"
        np.testing.assert_array_equal(values, X)
    assert from_json.message.id == "r1"
    assert from_json.binary_outputs == frozenset()
    assert from_binary.binary_outputs == {"variable"}
    assert [o.name for o in from_binary.message.outputs] == ["variable"]


def test_null_parameters_are_none() -> None:
    parsed = oip_rest.parse_infer(_json_body(parameters=None), None)
    assert dict(parsed.message.parameters) == {}


def test_request_parameters_keep_their_kinds() -> None:
    parsed = oip_rest.parse_infer(
        _json_body(parameters={"workspace": "ws", "n": 3, "f": 0.5, "b": True}), None
    )
    values = {k: oip.parameter_value(v) for k, v in parsed.message.parameters.items()}
    assert values == {"workspace": "ws", "n": 3, "f": 0.5, "b": True}
    assert oip.workspace_parameter(parsed.message) == "ws"


def _answer() -> pb.ModelInferResponse:
    y = np.array([[1.5], [2.25]], np.float32)
    return pb.ModelInferResponse(
        model_name="p",
        model_version="3",
        id="r1",
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(name="variable", datatype="FP32", shape=[2, 1])
        ],
        raw_output_contents=[y.tobytes()],
    )


def test_answers_in_json_or_binary_as_asked() -> None:
    body, length = oip_rest.render_infer(_answer(), frozenset())
    assert length is None
    document = json.loads(body)
    assert document["model_version"] == "3"
    assert document["outputs"] == [
        {"name": "variable", "datatype": "FP32", "shape": [2, 1], "data": [1.5, 2.25]}
    ]
    body, length = oip_rest.render_infer(_answer(), frozenset({"*"}))
    assert length is not None
    header = json.loads(body[:length])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 8}
    np.testing.assert_array_equal(np.frombuffer(body[length:], np.float32), [1.5, 2.25])


def _one(**tensor: object) -> bytes:
    """A body of one input tensor named x."""
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", **tensor}]}).encode()


@pytest.mark.parametrize(
    ("body", "length", "message"),
    [
        (b"{", None, "not JSON"),
        (b"[]", None, 'list "inputs"'),
        (_json_body()[:-1] + b', "outputs": [3]}', None, '"outputs" must be an object'),
        (_one(shape=[0], data=[]), None, "at least 1"),
        (_one(shape=[1], data=[1], datatype="FP99"), None, "FP99"),
        (_one(shape=[2], data=[1]), None, "2 values expected, got 1"),
        (_one(shape=[1], data=["a"]), None, "not a (nested) list"),
        (_one(shape=[1]), None, 'no "data"'),
        (b'{"inputs": []}', "99", "Inference-Header-Content-Length is '99'"),
        (b'{"inputs": []}xxxx', "14", "4 bytes of binary data no input declares"),
        (_one(shape=[1], parameters={"binary_data_size": 8}), None, "past the body's binary"),
        (_one(shape=[1], data=[1], parameters=[1]), None, '"parameters" of input'),
        (_one(shape=[2**40, 2**40], data=[1]), None, "more than one request may carry"),
        (_json_body(parameters=[1]), None, '"parameters" of the request'),
        (_json_body(parameters={"n": 2**63}), None, "past int64"),
        (_json_body(outputs=[{"name": "y", "parameters": [1]}]), None, "of output 'y'"),
    ],
)
def test_malformed_bodies_say_what_to_fix(body: bytes, length: str | None, message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        oip_rest.parse_infer(body, length)
