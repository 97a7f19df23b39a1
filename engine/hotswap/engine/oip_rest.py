"""The Open Inference Protocol's REST binding, translated to and from its gRPC messages.

An infer body is JSON, or JSON then binary tensor data (the binary data extension that
tritonclient sends by default: the ``Inference-Header-Content-Length`` header tells where the
JSON ends; each binary input says its size in ``parameters.binary_data_size``). Every input
becomes a raw tensor of a `ModelInferRequest`, which `oip.infer` serves exactly as it serves
gRPC. An output goes back as JSON ``data`` or, when asked for (``parameters.binary_data`` on
the output, or ``binary_data_output`` on the request), as binary after the JSON.
No HTTP here: `engine.http` reads bodies and writes answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from hotswap.engine import oip
from hotswap.engine.errors import InvalidInput
from hotswap.oip import grpc_service_pb2 as pb

BINARY_SIZE = "binary_data_size"


@dataclass(frozen=True, slots=True)
class RestRequest:
    message: pb.ModelInferRequest
    # Outputs to answer in binary ("*": all of them).
    binary_outputs: frozenset[str]


def parse_infer(body: bytes, header_length: str | None) -> RestRequest:
    """An infer body as a ModelInferRequest (all inputs raw).

    Raises:
        InvalidInput: the JSON or the binary parts do not make the tensors they declare.
    """
    if header_length is None:
        header, binary = body, b""
    else:
        try:
            size = int(header_length)
        except ValueError:
            size = -1
        if not 0 <= size <= len(body):
            raise InvalidInput(
                f"Inference-Header-Content-Length is {header_length!r} for a body of "
                f"{len(body)} bytes: give the length of the JSON part"
            )
        header, binary = body[:size], body[size:]
    try:
        document = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the request body is not JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
        raise InvalidInput('the request must be a JSON object with a list "inputs"')
    message = pb.ModelInferRequest(id=str(document.get("id", "")))
    parameters = document.get("parameters") or {}
    _set_parameters(message.parameters, parameters, "the request")
    offset = 0
    for index, tensor in enumerate(document["inputs"]):
        raw, used = _input(message, tensor, index, binary, offset)
        message.raw_input_contents.append(raw)
        offset += used
    if offset != len(binary):
        raise InvalidInput(
            f"the body has {len(binary) - offset} bytes of binary data no input declares "
            f"({BINARY_SIZE})"
        )
    binary_outputs = set()
    if parameters.get("binary_data_output") is True:
        binary_outputs.add("*")
    for tensor in document.get("outputs") or []:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise InvalidInput('each of "outputs" must be an object with a "name"')
        message.outputs.add(name=tensor["name"])
        wanted = tensor.get("parameters") or {}
        if not isinstance(wanted, dict):
            raise InvalidInput(f'"parameters" of output {tensor["name"]!r} must be an object')
        if wanted.get("binary_data") is True:
            binary_outputs.add(tensor["name"])
    return RestRequest(message, frozenset(binary_outputs))


def _input(
    message: pb.ModelInferRequest, tensor: Any, index: int, binary: bytes, offset: int
) -> tuple[bytes, int]:
    """Input `index` declared in `message`; its raw bytes and how many of `binary` it used."""
    if not isinstance(tensor, dict):
        raise InvalidInput(f"inputs[{index}] is not an object")
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    what = f"input {name!r}"
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise InvalidInput(f'inputs[{index}] needs a string "name" and "datatype"')
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 1 for d in shape):
        raise InvalidInput(f'{what} needs "shape": a list of dims, each at least 1')
    dtype = oip.DTYPES.get(datatype)
    if dtype is None:
        raise InvalidInput(f"{what} has datatype {datatype!r}; send one of {', '.join(oip.DTYPES)}")
    count = math.prod(shape)
    if count > oip.MAX_ELEMENTS:
        raise InvalidInput(f"{what} has {count} elements: more than one request may carry")
    declared = message.inputs.add(name=name, datatype=datatype, shape=shape)
    parameters = tensor.get("parameters") or {}
    _set_parameters(declared.parameters, parameters, what)  # raises unless an object
    if BINARY_SIZE in parameters:
        size = parameters[BINARY_SIZE]
        if not isinstance(size, int) or not 0 <= size <= len(binary) - offset:
            raise InvalidInput(f"{what}: {BINARY_SIZE} {size!r} is past the body's binary data")
        return binary[offset : offset + size], size
    if "data" not in tensor:
        raise InvalidInput(f'{what} has no "data" and no {BINARY_SIZE} parameter')
    try:
        values = np.asarray(tensor["data"], dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        raise InvalidInput(f"{what}: data is not a (nested) list of {datatype} values") from None
    if values.size != count:
        raise InvalidInput(
            f"{what} is {datatype} {shape}: {count} values expected, got {values.size}"
        )
    return values.tobytes(), 0


def _set_parameters(target: Any, parameters: Any, what: str) -> None:
    if parameters is None:
        return
    if not isinstance(parameters, dict):
        raise InvalidInput(f'"parameters" of {what} must be an object')
    for key, value in parameters.items():
        if isinstance(value, bool):
            target[key].bool_param = value
        elif isinstance(value, int):
            if not -(2**63) <= value < 2**63:
                raise InvalidInput(f"parameter {key!r} of {what} is past int64")
            target[key].int64_param = value
        elif isinstance(value, float):
            target[key].double_param = value
        elif isinstance(value, str):
            target[key].string_param = value
        else:
            raise InvalidInput(f"parameter {key!r} of {what} is not a bool, number or string")


def render_infer(
    response: pb.ModelInferResponse, binary_outputs: frozenset[str]
) -> tuple[bytes, int | None]:
    """The answer's body, and the length of its JSON part when binary data follows it."""
    outputs, parts = [], []
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if "*" in binary_outputs or tensor.name in binary_outputs:
            entry["parameters"] = {BINARY_SIZE: len(raw)}
            parts.append(raw)
        else:
            entry["data"] = _values(tensor.datatype, raw)
        outputs.append(entry)
    document = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "id": response.id,
        "parameters": {k: oip.parameter_value(v) for k, v in response.parameters.items()},
        "outputs": outputs,
    }
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not parts:
        return header, None
    return header + b"".join(parts), len(header)


def _values(datatype: str, raw: bytes) -> Any:
    """A raw tensor's values as JSON `data` takes them (flat, row-major): numpy, which orjson
    writes without a Python float per value, or strings for BYTES."""
    if datatype == "BYTES":
        values, at = [], 0
        while at < len(raw):
            size = int.from_bytes(raw[at : at + 4], "little")
            values.append(raw[at + 4 : at + 4 + size].decode(errors="replace"))
            at += 4 + size
        return values
    return np.frombuffer(raw, dtype=oip.DTYPES[datatype])


def metadata_document(message: pb.ModelMetadataResponse) -> dict[str, Any]:
    def tensors(specs: Any) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in specs]

    return {
        "name": message.name,
        "versions": list(message.versions),
        "platform": message.platform,
        "inputs": tensors(message.inputs),
        "outputs": tensors(message.outputs),
    }
