"""The Open Inference Protocol (KServe v2) on the engine: ``inference.GRPCInferenceService``.

A deployed pipeline is a model: its name is the pipeline name, its version the pipeline version
number, its inputs the first step's ONNX inputs and its outputs the last step's. A ModelInfer
takes the same path as ``hotswap.v1.Engine/Infer``: one look-up of the active version (so the
request is served wholly by it, even during a hot swap), then `LoadedPipeline.infer` on a
table built from the request's tensors, in the inference executor; the answer says which
version served it. A single-input pipeline takes the request's one tensor whatever its name;
a multi-input one takes tensors named after its ONNX inputs.

Tensors arrive as typed `contents` or `raw_input_contents` and leave as `raw_output_contents`
(what tritonclient reads). Raw tensors reach ONNX Runtime without a copy for float types.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from importlib import metadata
from typing import Any, cast

import grpc
import numpy as np

from hotswap.engine import access
from hotswap.engine.arrow_io import Array
from hotswap.engine.dataplane import DataPlane, Ran, check_rows
from hotswap.engine.errors import InvalidInput, PipelineLoading, PipelineNotServed
from hotswap.engine.health import readiness
from hotswap.engine.host import EngineHost
from hotswap.engine.runtime import Inferred, LoadedPipeline, TensorInfo
from hotswap.engine.servicers import STATUS
from hotswap.oip import grpc_service_pb2 as oip
from hotswap.oip import grpc_service_pb2_grpc as oip_grpc
from hotswap.service.edge import unary_errors

unary = unary_errors(STATUS)
Context = grpc.aio.ServicerContext[Any, Any]

PLATFORM = "onnxruntime_onnx"
# Elements one input tensor may declare (what a 64 MiB message could hold, in bytes).
MAX_ELEMENTS = 64 * 1024 * 1024
EXTENSIONS = ("model_repository",)

# The protocol's datatypes, from ONNX Runtime's element types and numpy's dtypes.
_FROM_ONNX = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_BY_KIND = {(dtype.kind, dtype.itemsize): name for name, dtype in DTYPES.items()}
# Which typed field carries each datatype; narrow integers travel widened.
_CONTENTS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
_FIELD_DTYPES = {
    "bool_contents": np.dtype(np.bool_),
    "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint32),
    "uint64_contents": np.dtype(np.uint64),
    "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}
# Host states of a pipeline without an active version, as the repository index shows them.
_REPOSITORY_STATES = {"Running": "READY", "Loading": "LOADING", "Error": "UNAVAILABLE"}

# -- protocol messages <-> tensors (no grpc, no ONNX Runtime) ---------------------------------


def parameter_value(parameter: oip.InferParameter) -> bool | int | float | str | None:
    """The value of any InferParameter kind (None when none is set)."""
    kind = parameter.WhichOneof("parameter_choice")
    return None if kind is None else getattr(parameter, kind)


def input_tensors(request: oip.ModelInferRequest) -> list[tuple[str, Array]]:
    """The request's tensors as numpy arrays shaped as declared, in request order.

    Raises:
        InvalidInput: unknown datatype, data that does not match the shape, or a mix of raw
            and typed contents.
    """
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} input(s): "
            "send one per input, in order"
        )
    tensors = []
    for index, tensor in enumerate(request.inputs):
        what = f"input {tensor.name!r}"
        dtype = DTYPES.get(tensor.datatype)
        if dtype is None:
            known = ", ".join(DTYPES)
            raise InvalidInput(f"{what} has datatype {tensor.datatype!r}; send one of {known}")
        shape = tuple(tensor.shape)
        if not shape or min(shape) < 1:
            raise InvalidInput(
                f"{what} has shape {list(shape)}: give every dim (each at least 1), the first "
                "being the rows"
            )
        count = math.prod(shape)
        if count > MAX_ELEMENTS:
            raise InvalidInput(
                f"{what} has shape {list(shape)}: {count} elements, more than one request "
                f"may carry ({MAX_ELEMENTS}); send fewer rows per request"
            )
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(f"{what} has contents and raw_input_contents: send one")
            data = raw[index]
            if len(data) != count * dtype.itemsize:
                raise InvalidInput(
                    f"{what} is {tensor.datatype} {list(shape)}: {count * dtype.itemsize} raw "
                    f"bytes expected, got {len(data)}"
                )
            values = np.frombuffer(data, dtype=dtype)
        else:
            values = _typed_values(tensor, dtype, count, what)
        tensors.append((tensor.name, values.reshape(shape)))
    return tensors


def _typed_values(
    tensor: oip.ModelInferRequest.InferInputTensor, dtype: np.dtype[Any], count: int, what: str
) -> Array:
    field = _CONTENTS.get(tensor.datatype)
    if field is None:
        raise InvalidInput(f"{what}: {tensor.datatype} has no typed contents; send it raw")
    used = [f.name for f, _ in tensor.contents.ListFields()]
    if used and used != [field]:
        raise InvalidInput(f"{what} is {tensor.datatype}: its data goes in contents.{field}")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidInput(
            f"{what} is {tensor.datatype} {list(tensor.shape)}: {count} values expected, "
            f"got {len(values)} in contents.{field}"
        )
    wide = np.asarray(values, dtype=_FIELD_DTYPES[field])
    if dtype.kind in "iu" and dtype.itemsize < wide.dtype.itemsize and wide.size:
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidInput(f"{what} has values outside {tensor.datatype}'s range")
    return wide.astype(dtype, copy=False)


def input_columns(loaded: LoadedPipeline, tensors: Sequence[tuple[str, Array]]) -> dict[str, Array]:
    """The arrays `loaded.infer_arrays` reads, by input column: a single-input pipeline's one
    tensor is its column whatever its name; otherwise each tensor goes by its own name.

    Raises:
        InvalidInput: the wrong number or names of tensors, or tensors with different rows.
    """
    columns = loaded.input_columns()
    name = loaded.spec.pipeline
    keys = loaded.key_columns()
    if keys:  # the columns a split step chooses by: extra tensors, beside the model's
        named_keys = {n: v for n, v in tensors if n in keys}
        tensors = [(n, v) for n, v in tensors if n not in keys]
    if len(columns) == 1:
        if len(tensors) != 1:
            raise InvalidInput(f"model {name!r} takes one input tensor; got {len(tensors)}")
        named = {columns[0]: tensors[0][1]}
    else:
        given = [n for n, _ in tensors]
        if sorted(given) != sorted(columns):
            raise InvalidInput(f"model {name!r} takes inputs {columns}; got {given}")
        named = dict(tensors)
    if keys:
        named.update(named_keys)
    rows = {values.shape[0] for values in named.values()}
    if len(rows) > 1:
        raise InvalidInput(f"the input tensors have different first dims {sorted(rows)}")
    return named


def add_outputs(
    response: oip.ModelInferResponse,
    outputs: Sequence[Array],
    loaded: LoadedPipeline,
    wanted: Sequence[str],
) -> int:
    """Appends the last step's outputs (those `wanted`, or all) to `response` as output
    tensors and their raw bytes; returns their size in bytes.

    Raises:
        InvalidInput: a requested output the model does not have.
    """
    names = loaded.output_names
    size = 0
    if not wanted:  # every output, in order: the common case, without the look-ups
        for name, values in zip(names, outputs, strict=True):
            size += _add_output(response, name, values)
        return size
    for name in wanted:
        if name not in names:
            raise InvalidInput(f"model {loaded.spec.pipeline!r} has no output {name!r} ({names})")
    by_name = dict(zip(names, outputs, strict=True))
    for name in wanted:
        size += _add_output(response, name, by_name[name])
    return size


def _add_output(response: oip.ModelInferResponse, name: str, values: Array) -> int:
    """Appends one output; returns its size in bytes."""
    if values.dtype.kind in "OUS":
        datatype, raw = "BYTES", _bytes_raw(values)
    else:
        datatype = _BY_KIND[(values.dtype.kind, values.dtype.itemsize)]
        raw = values.astype(DTYPES[datatype], copy=False).tobytes()
    response.outputs.add(name=name, datatype=datatype, shape=values.shape)
    response.raw_output_contents.append(raw)
    return len(raw)


SPLIT_OUTPUT = "_model_split"
"""The output tensor that names each row's models in answers of versions with split steps."""


def _bytes_raw(values: Array) -> bytes:
    """Strings as the protocol's BYTES: each element's length as a 4-byte little-endian
    integer, then its bytes."""
    parts = []
    for item in values.reshape(-1).tolist():
        data = item.encode() if isinstance(item, str) else bytes(item)
        parts += [len(data).to_bytes(4, "little"), data]
    return b"".join(parts)


def tensor_metadata(spec: TensorInfo) -> oip.ModelMetadataResponse.TensorMetadata:
    return oip.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=_FROM_ONNX.get(spec.type, spec.type), shape=spec.shape
    )


# -- the request path ------------------------------------------------------------------------


def infer(
    loaded: LoadedPipeline, request: oip.ModelInferRequest, max_rows: int
) -> Ran[oip.ModelInferResponse]:
    """Decode, infer, encode one request, wholly on `loaded` (gRPC's and REST's: the REST
    routes translate their JSON to and from these messages)."""
    started = time.perf_counter_ns()
    answers = loaded.kept(_Answers)
    values = answers.plain_tensor(request, max_rows)
    if values is not None:  # the common request: nothing to look for, check or convert
        inferred = loaded.infer_tensor(values)
        response = answers.response(request)
        size = values.nbytes + add_outputs(response, inferred.outputs, loaded, ())
        return _ran(response, inferred, started, size)
    columns = input_columns(loaded, input_tensors(request))
    check_rows(next(iter(columns.values())).shape[0], max_rows)
    inferred = loaded.infer_arrays(columns)
    wanted = [o.name for o in request.outputs]
    split = inferred.split_labels()
    named = [w for w in wanted if w != SPLIT_OUTPUT] if split is not None else wanted
    response = answers.response(request)
    size = sum(v.nbytes for v in columns.values())
    if named or not wanted:
        size += add_outputs(response, inferred.outputs, loaded, named)
    if split is not None and (not wanted or SPLIT_OUTPUT in wanted):
        # Which model served each row: BYTES [rows, split steps] of Wallaroo's JSON.
        size += _add_output(response, SPLIT_OUTPUT, split)
    return _ran(response, inferred, started, size)


def _ran(
    response: oip.ModelInferResponse, inferred: Inferred, started: int, size: int
) -> Ran[oip.ModelInferResponse]:
    """`size`: the request's and the answer's tensor bytes (what the log's bound counts)."""
    elapsed_ns = time.perf_counter_ns() - started
    response.parameters["elapsed_ns"].int64_param = elapsed_ns
    return Ran(response, inferred, elapsed_ns, size, inferred.shadows)


class _Answers:
    """What every answer of one loaded version shares, built on its first request: the
    response naming what served it, and the input a plain request feeds as is."""

    __slots__ = ("_datatype", "_dtype", "_row", "_row_bytes", "_template")

    def __init__(self, loaded: LoadedPipeline) -> None:
        spec = loaded.spec
        self._template = oip.ModelInferResponse(
            model_name=spec.pipeline,
            model_version=str(spec.number),
            parameters={
                "workspace": oip.InferParameter(string_param=spec.workspace),
                "pipeline_version_id": oip.InferParameter(string_param=spec.version_id),
                "models": oip.InferParameter(string_param=loaded.identity["hotswap.models"]),
            },
        )
        reader = loaded.plain_input
        datatype = (
            None if reader is None else _BY_KIND.get((reader.dtype.kind, reader.dtype.itemsize))
        )
        # The protocol's raw bytes are little-endian: fed as is only where the model's are.
        if reader is None or datatype is None or DTYPES[datatype] != reader.dtype:
            self._datatype = None
            return
        self._datatype = datatype
        self._dtype = reader.dtype
        self._row = cast(tuple[int, ...], reader.static_row)
        self._row_bytes = math.prod(self._row) * reader.dtype.itemsize

    def response(self, request: oip.ModelInferRequest) -> oip.ModelInferResponse:
        response = oip.ModelInferResponse()
        response.CopyFrom(self._template)
        response.id = request.id
        return response

    def plain_tensor(self, request: oip.ModelInferRequest, max_rows: int) -> Array | None:
        """The model's input tensor, when `request` is one raw tensor of the model's own
        datatype and row shape asking for every output; None for any other request, which the
        general path serves (and refuses, with its messages)."""
        if self._datatype is None or request.outputs or len(request.inputs) != 1:
            return None
        raw = request.raw_input_contents
        tensor = request.inputs[0]
        if len(raw) != 1 or tensor.datatype != self._datatype or tensor.HasField("contents"):
            return None
        shape = tuple(tensor.shape)
        rows = shape[0] if shape else 0
        if shape[1:] != self._row or not 0 < rows <= max_rows:
            return None
        data = raw[0]
        if len(data) != rows * self._row_bytes:
            return None
        return np.frombuffer(data, dtype=self._dtype).reshape(shape)


def lookup(
    host: EngineHost, caller: access.Caller, name: str, version: str, workspace: str = ""
) -> LoadedPipeline:
    """The loaded version of model (pipeline) `name` that `caller` may use.

    Raises:
        PermissionDenied: `workspace` is not the caller's.
        PipelineNotServed: no such model here, or not at `version`.
        PipelineLoading: it is still loading.
    """
    if workspace:
        caller.check(workspace)
    loaded = host.lookup(workspace, name, caller.may_use)
    if version and version != str(loaded.spec.number):
        raise PipelineNotServed(
            f"model {name!r} version {version} is not served by this engine (it serves "
            f"version {loaded.spec.number}); omit the version to use the serving one"
        )
    return loaded


def model_metadata(loaded: LoadedPipeline) -> oip.ModelMetadataResponse:
    return oip.ModelMetadataResponse(
        name=loaded.spec.pipeline,
        versions=[str(loaded.spec.number)],
        platform=PLATFORM,
        inputs=[tensor_metadata(s) for s in loaded.input_specs()],
        outputs=[tensor_metadata(s) for s in loaded.output_specs()],
    )


def server_metadata() -> oip.ServerMetadataResponse:
    return oip.ServerMetadataResponse(name="hotswap", version=_version(), extensions=EXTENSIONS)


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """Decode, call the host and the loaded pipeline, encode: nothing else."""

    def __init__(self, host: EngineHost, plane: DataPlane) -> None:
        self._host = host
        self._plane = plane

    def _lookup(self, name: str, version: str, workspace: str = "") -> LoadedPipeline:
        return lookup(self._host, access.current.get(), name, version, workspace)

    async def ServerLive(
        self, request: oip.ServerLiveRequest, context: Context
    ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: oip.ServerReadyRequest, context: Context
    ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=readiness(self._host)[0])

    async def ModelReady(
        self, request: oip.ModelReadyRequest, context: Context
    ) -> oip.ModelReadyResponse:
        try:
            self._lookup(request.name, request.version)
        except (PipelineNotServed, PipelineLoading):
            return oip.ModelReadyResponse(ready=False)
        return oip.ModelReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: Context
    ) -> oip.ServerMetadataResponse:
        return server_metadata()

    @unary
    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: Context
    ) -> oip.ModelMetadataResponse:
        return model_metadata(self._lookup(request.name, request.version))

    @unary
    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: Context
    ) -> oip.ModelInferResponse:
        workspace = workspace_parameter(request)
        max_rows = self._plane.max_rows
        served = await self._plane.serve(
            lambda: self._lookup(request.model_name, request.model_version, workspace),
            lambda loaded: infer(loaded, request, max_rows),
            nbytes=sum(map(len, request.raw_input_contents)),
        )
        return served.answer

    async def RepositoryIndex(
        self, request: oip.RepositoryIndexRequest, context: Context
    ) -> oip.RepositoryIndexResponse:
        caller = access.current.get()
        models = [
            oip.RepositoryIndexResponse.ModelIndex(
                name=state.key.split("/", 1)[1],
                version=str(state.active.spec.number) if state.active else "",
                state=_REPOSITORY_STATES[state.state] if state.active is None else "READY",
                reason=state.error,
            )
            for state in self._host.states()
            if (state.active is not None or not request.ready)
            and caller.may_use(state.key.split("/", 1)[0])
        ]
        return oip.RepositoryIndexResponse(models=models)


def workspace_parameter(request: oip.ModelInferRequest) -> str:
    """The optional `workspace` request parameter: which workspace's pipeline, when several
    workspaces deploy pipelines of the same name to this engine."""
    if "workspace" not in request.parameters:
        return ""
    value = parameter_value(request.parameters["workspace"])
    if not isinstance(value, str):
        raise InvalidInput("the 'workspace' parameter must be a string")
    return value


def _version() -> str:
    try:
        return metadata.version("hotswap")
    except metadata.PackageNotFoundError:
        return "unknown"
