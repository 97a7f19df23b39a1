"""The engine's inference runtime: one pipeline version built into ONNX Runtime sessions.

`LoadedPipeline.build` does all the slow and fallible work up front (sessions, chain checks,
a warm-up inference) so that serving a request is a few dictionary look-ups, zero-copy Arrow
to numpy views and one `session.run` per step. A built pipeline never changes: the engine
serves it from many threads and swaps a single reference to move to the next version.

Data conventions (design.md): a single-input first step reads the column `tensor` (or a column
named after its ONNX input); a multi-input first step reads one column per ONNX input name.
Step i+1 takes step i's outputs: by name when they match, otherwise the first output.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias, cast

import numpy as np
import onnxruntime as ort
import pyarrow as pa
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from hotswap.engine.arrow_io import (
    Array,
    BoundedCache,
    Dims,
    InputReader,
    array_of,
    as_batch,
    decode_ipc,
    encode_ipc,
    format_dims,
    int32_zeros,
    ndarray_to_arrow,
    schema_message,
    tensor_to_arrow,
    timestamp_column,
)
from hotswap.engine.errors import EngineError, InvalidInput, PrepareError, WarmupFailed
from hotswap.engine.fast_ipc import AnswerTemplate, RequestLayout

__all__ = [
    "TENSOR_COLUMN",
    "LoadedPipeline",
    "PipelineSpec",
    "RuntimeOptions",
    "StepSpec",
    "TensorInfo",
    "decode_ipc",
    "encode_ipc",
]

TENSOR_COLUMN = "tensor"
"""The column a single-input first step reads, whatever its ONNX input is called."""

# ONNX Runtime's exceptions share no base class beyond Exception; collect them so that build
# catches exactly these instead of a catch-all.
_ORT_ERRORS: tuple[type[Exception], ...] = tuple(
    value
    for value in vars(ort_state).values()
    if isinstance(value, type)
    and issubclass(value, Exception)
    and value.__module__ == ort_state.__name__
)
_LOAD_ERRORS: tuple[type[Exception], ...] = (*_ORT_ERRORS, OSError, ValueError, RuntimeError)
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")

_ELEMENT_TYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    **{
        f"tensor({name})": np.dtype(name)
        for name in ("float16", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32")
    },
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
}


# Answer templates one version keeps (request schemas x row counts x exclusions).
_TEMPLATES_KEPT = 64
# Requests of more rows are answered without a template (a template holds ~16 bytes a row).
_TEMPLATE_ROWS = 4096

# Timed 1-row inferences after the first (allocating) one, to learn a request's real cost.
WARM_RUNS = 3


@dataclass(frozen=True, slots=True)
class StepSpec:
    """One step of a pipeline version: a model version and its local, sha-verified ONNX file."""

    model_name: str
    model_version: str
    sha256: str
    path: Path


@dataclass(frozen=True, slots=True)
class PipelineSpec:
    """A pipeline version to serve: its identity (echoed in every response) and its steps."""

    workspace: str
    pipeline: str
    version_id: str
    number: int
    steps: tuple[StepSpec, ...]


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """ONNX Runtime threading. 0 means ONNX Runtime's default (one thread per core).

    One intra-op thread maximises 1-row throughput on small machines; more threads help large
    batches (design.md, performance notes), so the engine makes this configurable.
    """

    intra_op_threads: int = 1
    inter_op_threads: int = 1

    def __post_init__(self) -> None:
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ValueError("thread counts must be >= 0 (0 = ONNX Runtime's default)")


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """An ONNX input or output as ONNX Runtime reports it."""

    name: str
    type: str  # e.g. "tensor(float)"
    shape: tuple[int, ...]  # -1 for a dynamic dim; () when the rank is unknown


@dataclass(frozen=True, slots=True)
class _Step:
    label: str  # "step 1 (model 'scale')", used in every message about this step
    session: Any
    outputs: list[str]  # the outputs requested from ONNX Runtime, in this order
    # For every step but the first: (input name, index into the previous step's requested
    # outputs, row dims to reshape to when the shapes differ but the sizes match).
    feeds: tuple[tuple[str, int, tuple[int, ...] | None], ...]

    def run(self, feed: dict[str, Array]) -> list[Array]:
        try:
            outputs: list[Array] = self.session.run(self.outputs, feed)
        except ort_state.InvalidArgument as exc:
            raise InvalidInput(f"{self.label} rejected the input: {_ort_message(exc)}") from exc
        except _ORT_ERRORS as exc:
            # Not the caller's fault as far as we can tell: an unexpected error, but one whose
            # message still names the step.
            raise RuntimeError(f"{self.label} failed: {_ort_message(exc)}") from exc
        return outputs


class LoadedPipeline:
    """A pipeline version ready to serve: one ONNX Runtime session per step.

    Immutable once built and safe to call from many threads at once; the engine swaps one
    reference to it atomically. Dropping the last reference releases the sessions.

    Attributes:
        spec: The pipeline version this serves.
        load_ms: Time spent building all sessions, in milliseconds.
        warmup_ms: Time of the warm-up inference, in milliseconds.
    """

    __slots__ = (
        "__weakref__",  # lets the engine (and tests) check that a retired version is freed
        "_answer_schemas",
        "_inputs",
        "_last_label",
        "_later",
        "_metadata",
        "_out_columns",
        "_out_names",
        "_schema_cache",
        "_steps",
        "_templates",
        "load_ms",
        "row_ms",
        "spec",
        "warmup_ms",
    )

    spec: PipelineSpec
    load_ms: float
    warmup_ms: float
    row_ms: float  # steady-state time of a 1-row inference, measured at warm-up

    def __init__(self, spec: PipelineSpec, sessions: Sequence[Any], load_ms: float) -> None:
        """Plan a pipeline over already-built sessions; use `build` instead."""
        self.spec = spec
        self.load_ms = load_ms
        self.warmup_ms = 0.0
        self.row_ms = math.inf
        labels = [f"step {i} (model {s.model_name!r})" for i, s in enumerate(spec.steps)]
        self._inputs = _plan_inputs(spec.steps[0].model_name, labels[0], sessions[0])
        self._steps = _plan_steps(labels, sessions)
        self._later = self._steps[1:]
        self._last_label = labels[-1]
        self._out_names = self._steps[-1].outputs
        self._out_columns = [f"out.{name}" for name in self._out_names]
        # (input schema, output dtypes and ranks, output schema) of the last request: building
        # the output schema costs more than checking that the next request has the same one.
        # The answer's schema message is kept too: encoding it costs more than the batch.
        self._schema_cache: (
            tuple[pa.Schema, list[tuple[np.dtype[Any], int]], pa.Schema, bytes] | None
        ) = None
        # Answer templates of `fast_ipc` requests (see `answer`), with where each hole's
        # values come from.
        self._templates: BoundedCache[
            tuple[int, int, frozenset[str], tuple[tuple[str, tuple[int, ...]], ...]],
            tuple[RequestLayout, AnswerTemplate, list[Hole]],
        ] = BoundedCache(_TEMPLATES_KEPT)
        # By excluded column groups: (result schema, kept column indices, schema message).
        self._answer_schemas: dict[frozenset[str], tuple[pa.Schema, list[int], bytes]] = {}
        models = [
            {"name": s.model_name, "version": s.model_version, "sha256": s.sha256}
            for s in spec.steps
        ]
        self._metadata = pa.KeyValueMetadata(
            {
                b"hotswap.workspace": spec.workspace.encode(),
                b"hotswap.pipeline": spec.pipeline.encode(),
                b"hotswap.pipeline_version": str(spec.number).encode(),
                b"hotswap.pipeline_version_id": spec.version_id.encode(),
                b"hotswap.models": json.dumps(models).encode(),
            }
        )

    @classmethod
    def build(
        cls,
        spec: PipelineSpec,
        options: RuntimeOptions,
        reuse: Mapping[str, Any] | None = None,
        *,
        warm_up: bool = True,
    ) -> LoadedPipeline:
        """Build the sessions from the steps' files, check the chain, run a warm-up inference
        (unless `warm_up` is off: for steps another loaded version already chains and warmed).

        Blocks for as long as ONNX Runtime needs (seconds for big models): call it in a thread.
        `reuse` maps model sha256 to sessions already loaded (with the same options) by other
        versions; those steps share them instead of building (ORT sessions are thread-safe).

        Raises:
            PrepareError: a model cannot be loaded, consecutive steps do not fit together, or
                the warm-up inference fails. The message names the step and the model.
        """
        if not spec.steps:
            raise PrepareError(f"pipeline {spec.pipeline!r} version {spec.number} has no steps")
        started = time.perf_counter()
        reuse = reuse or {}
        sessions = [
            reuse.get(step.sha256) or _open_session(i, step, options)
            for i, step in enumerate(spec.steps)
        ]
        pipeline = cls(spec, sessions, (time.perf_counter() - started) * 1000)
        if warm_up:
            started = time.perf_counter()
            pipeline._warm_up()
            pipeline.warmup_ms = (time.perf_counter() - started) * 1000
        return pipeline

    def sessions_by_sha(self) -> dict[str, Any]:
        """This version's ONNX Runtime sessions by model sha256 (for reuse by other versions)."""
        return {
            step.sha256: run.session for step, run in zip(self.spec.steps, self._steps, strict=True)
        }

    def input_columns(self) -> list[str]:
        """The columns the first step reads, e.g. `["tensor"]`."""
        return [plan.columns[0] for plan in self._inputs]

    def input_specs(self) -> list[TensorInfo]:
        """The first step's ONNX inputs, in order: the pipeline's inputs."""
        return [_tensor_info(arg) for arg in self._steps[0].session.get_inputs()]

    def output_specs(self) -> list[TensorInfo]:
        """The last step's ONNX outputs, in order: the `out.<name>` columns of a result."""
        by_name = {arg.name: arg for arg in self._steps[-1].session.get_outputs()}
        return [_tensor_info(by_name[name]) for name in self._out_names]

    def infer(self, rows: pa.RecordBatch | pa.Table) -> pa.RecordBatch:
        """Run every step on the rows and return the result rows (design.md).

        Raises:
            InvalidInput: the rows cannot feed the first step (missing column, wrong width,
                non-numeric values, nulls, ragged rows, no rows), or a step rejected the data.
        """
        batch = as_batch(rows)
        n = batch.num_rows
        if n == 0:
            raise InvalidInput("the table has no rows: send at least one")
        epoch_ms = time.time_ns() // 1_000_000
        outputs = self._run({plan.input_name: plan.tensor(batch, n) for plan in self._inputs}, n)
        return self._result(epoch_ms, batch.columns, batch.schema, outputs)

    def infer_arrays(
        self, columns: Mapping[str, Array], schema: pa.Schema | None = None
    ) -> Inferred:
        """Run every step on arrays shaped `[rows, ...]` by column name (the Open Inference
        Protocol's tensors, or a request `fast_ipc` read): no Arrow on the way in or out.
        The result rows are built only if asked for (by the inference log, off the request
        path); `schema` gives the echoed columns' types, when they came as Arrow.

        Raises:
            InvalidInput: as `infer` (`takes(columns)` says whether the columns are there).
        """
        feed = {}
        for plan in self._inputs:
            column = next(c for c in plan.columns if c in columns)
            feed[plan.input_name] = plan.array(columns[column], column)
        n = next(iter(feed.values())).shape[0]
        epoch_ms = time.time_ns() // 1_000_000
        return Inferred(self, epoch_ms, columns, self._run(feed, n), schema)

    def takes(self, columns: Mapping[str, Array]) -> bool:
        """Whether `columns` has a column for every input."""
        return all(any(c in columns for c in plan.columns) for plan in self._inputs)

    def answer(self, inferred: Inferred, layout: RequestLayout, exclude: frozenset[str]) -> bytes:
        """The answer to a request `fast_ipc` read: the template of this version, request
        schema, row count and exclusion with this request's values in place, or (the first
        time, or for outputs a template cannot hold) encoded from the result rows."""
        # The outputs' types and shapes are in the key: a model with dynamic output shapes
        # gives answers of other layouts, whose holes could still have the same sizes.
        shapes = tuple((v.dtype.str, v.shape) for v in inferred.outputs)
        key = (id(layout), inferred.num_rows, exclude, shapes)
        known = self._templates.get(key)
        if known is not None and known[0] is layout:
            answer = known[1].render(inferred.hole_values(known[2]))
            if answer is not None:
                return answer
        result = inferred.batch()
        answer = self.encode(result, exclude)
        if inferred.num_rows <= _TEMPLATE_ROWS and all(
            v.dtype.kind in "iuf" for v in inferred.outputs
        ):
            kept = [n for n in result.schema.names if _part(n) not in exclude]
            holes = [i for i, name in enumerate(kept) if _part(name) in ("time", "in", "out")]
            template = AnswerTemplate.of(answer, result.select(kept), holes)
            self._templates.put(key, (layout, template, [self._hole(kept[i]) for i in holes]))
        return answer

    def _hole(self, column: str) -> Hole:
        """Where a result column's values come from: ("time", 0), ("in", input column) or
        ("out", output index)."""
        group, _, name = column.partition(".")
        if group == "out":
            return ("out", self._out_names.index(name))
        return (group, name)

    def _run(self, feed: dict[str, Array], n: int) -> list[Array]:
        outputs = self._steps[0].run(feed)
        for step in self._later:
            feed = {}
            for name, source, row in step.feeds:
                value = outputs[source]
                feed[name] = value if row is None else value.reshape(value.shape[0], *row)
            outputs = step.run(feed)
        for name, value in zip(self._out_names, outputs, strict=True):
            if value.ndim == 0 or value.shape[0] != n:
                raise InvalidInput(
                    f"{self._last_label} output {name!r} has shape {list(value.shape)} for a "
                    f"{n}-row request: the model does not return one row per input row"
                )
        return outputs

    def _result(
        self,
        epoch_ms: int | Array,
        inputs: list[pa.Array],
        in_schema: pa.Schema,
        outputs: list[Array],
    ) -> pa.RecordBatch:
        """The result rows: time (one instant, or one per row), the inputs echoed, the
        outputs, check_failures."""
        n = len(outputs[0])
        columns = [timestamp_column(epoch_ms, n), *inputs]
        columns += [ndarray_to_arrow(value) for value in outputs]
        columns.append(int32_zeros(n))
        kinds = [(value.dtype, value.ndim) for value in outputs]
        cached = self._schema_cache
        if cached is not None and cached[1] == kinds and in_schema.equals(cached[0]):
            return pa.RecordBatch.from_arrays(columns, schema=cached[2])
        names = [
            "time",
            *["in." + name for name in in_schema.names],
            *self._out_columns,
            "check_failures",
        ]
        # Attaching prebuilt metadata afterwards is ~2x cheaper than from_arrays(metadata=...).
        result = pa.RecordBatch.from_arrays(columns, names=names)
        result = result.replace_schema_metadata(self._metadata)
        # One slot, replaced whole: threads racing on it only cost a rebuild.
        self._schema_cache = (in_schema, kinds, result.schema, schema_message(result.schema))
        return result

    @property
    def output_names(self) -> list[str]:
        """The last step's outputs, in the order results hold them."""
        return list(self._out_names)

    def encode(self, result: pa.RecordBatch, exclude: frozenset[str] = frozenset()) -> bytes:
        """`result` (from `infer`) as Arrow IPC stream bytes, without the column groups in
        `exclude` (`answer_parts`). The schema message is built once per version, request
        schema and exclusion, not once per request."""
        schema = result.schema
        if not exclude:
            cached = self._schema_cache
            if cached is not None and schema.equals(cached[2], check_metadata=True):
                return encode_ipc(result, cached[3])
            return encode_ipc(result)
        known = self._answer_schemas.get(exclude)
        if known is None or not schema.equals(known[0], check_metadata=True):
            keep = [i for i, name in enumerate(schema.names) if _part(name) not in exclude]
            known = (schema, keep, schema_message(result.select(keep).schema))
            self._answer_schemas[exclude] = known  # a handful of keys: answer_parts' subsets
        return encode_ipc(result.select(known[1]), known[2])

    def __repr__(self) -> str:
        spec = self.spec
        return (
            f"<LoadedPipeline {spec.workspace}/{spec.pipeline} v{spec.number} "
            f"({len(spec.steps)} step(s))>"
        )

    def _warm_up(self) -> None:
        columns = {}
        for plan in self._inputs:
            dims = (1,) if plan.row is None else tuple(d or 1 for d in plan.row)
            zeros = np.zeros((plan.batch or 1, *dims), dtype=plan.dtype)
            columns[plan.columns[0]] = ndarray_to_arrow(zeros)
        table = pa.RecordBatch.from_pydict(columns)
        try:
            self.infer(table)
            # The first call allocates; later ones show what a small request really costs.
            for _ in range(WARM_RUNS):
                started = time.perf_counter()
                self.infer(table)
                self.row_ms = min(self.row_ms, (time.perf_counter() - started) * 1000)
        except (EngineError, RuntimeError, ValueError) as exc:
            raise WarmupFailed(f"warm-up inference on a zero-filled row failed: {exc}") from exc


class Inferred:
    """The outcome of `infer_arrays`: the output arrays now, the result rows on demand."""

    __slots__ = ("_batch", "_epoch_ms", "_inputs", "_loaded", "_schema", "num_rows", "outputs")

    def __init__(
        self,
        loaded: LoadedPipeline,
        epoch_ms: int,
        inputs: Mapping[str, Array],
        outputs: list[Array],
        schema: pa.Schema | None = None,
    ) -> None:
        self._loaded = loaded
        self._epoch_ms = epoch_ms
        self._inputs = inputs
        self._schema = schema
        self.outputs = outputs
        self.num_rows = len(outputs[0])
        self._batch: pa.RecordBatch | None = None

    def batch(self) -> pa.RecordBatch:
        """The result rows, as `infer` returns them; built once. The inputs are echoed with
        the request's types, or as fixed-size lists when it sent tensors."""
        if self._batch is None:
            self._batch = self._build(self._epoch_ms)
        return self._batch

    def _build(self, times: int | Array) -> pa.RecordBatch:
        if self._schema is None:
            arrays = [tensor_to_arrow(values) for values in self._inputs.values()]
            names = list(self._inputs)
            schema = pa.schema([(n, a.type) for n, a in zip(names, arrays, strict=True)])
        else:
            schema = self._schema
            arrays = [array_of(self._inputs[f.name], f.type) for f in schema]
        return self._loaded._result(times, arrays, schema, self.outputs)

    def signature(self) -> tuple[Any, ...]:
        """What results must share to be built as one batch (`merged_batch`)."""
        return (
            id(self._loaded),
            id(self._schema),
            tuple((k, v.dtype.str, v.shape[1:]) for k, v in self._inputs.items()),
            tuple((v.dtype.str, v.shape[1:]) for v in self.outputs),
        )

    @staticmethod
    def merged_batch(run: Sequence[Inferred]) -> pa.RecordBatch:
        """The result rows of results of one `signature`, as one batch: a few numpy
        concatenations instead of a batch per request."""
        first = run[0]
        if len(run) == 1:
            return first.batch()
        inputs = {k: np.concatenate([r._inputs[k] for r in run]) for k in first._inputs}
        outputs = [np.concatenate([r.outputs[i] for r in run]) for i in range(len(first.outputs))]
        times = np.repeat(
            np.fromiter((r._epoch_ms for r in run), np.int64, len(run)),
            np.fromiter((r.num_rows for r in run), np.int64, len(run)),
        )
        merged = Inferred(first._loaded, 0, inputs, outputs, first._schema)
        return merged._build(times)

    def hole_values(self, holes: Sequence[Hole]) -> list[memoryview]:
        """The bytes of the result columns a template leaves open (time, in.*, out.*)."""
        values = []
        for group, key in holes:
            if group == "time":
                array: Array = np.full(self.num_rows, self._epoch_ms, dtype=np.int64)
            elif group == "in":
                array = self._inputs[cast(str, key)]
            else:
                array = self.outputs[cast(int, key)]
            values.append(memoryview(np.ascontiguousarray(array).data).cast("B"))
        return values


Hole: TypeAlias = tuple[str, str | int]
"""Where a template hole's values come from (`LoadedPipeline._hole`)."""

LogRows: TypeAlias = "pa.RecordBatch | Inferred"
"""What the inference log is given for a request: its result rows, or what builds them."""


ANSWER_PARTS = ("time", "in", "out", "check_failures")
"""The column groups of a result, which a request may leave out of its answer."""


def answer_parts(exclude: Sequence[str]) -> frozenset[str]:
    """The groups a request's `dataset_exclude` names.

    Raises:
        InvalidInput: a name that is not a column group.
    """
    unknown = [name for name in exclude if name not in ANSWER_PARTS]
    if unknown:
        raise InvalidInput(
            f"dataset_exclude names {unknown}: the column groups are {list(ANSWER_PARTS)}"
        )
    return frozenset(exclude)


def _part(column: str) -> str:
    """The group of a result column: `in.tensor` -> "in", `time` -> "time"."""
    return column.split(".", 1)[0]


def _open_session(index: int, step: StepSpec, options: RuntimeOptions) -> Any:
    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = options.intra_op_threads
    session_options.inter_op_num_threads = options.inter_op_threads
    session_options.log_severity_level = 3  # errors only: ORT's warnings would flood the log
    try:
        # From the path, never from bytes: building from bytes holds the GIL far longer and
        # stalls serving on the event loop (onnxruntime#27063).
        return ort.InferenceSession(
            str(step.path), sess_options=session_options, providers=["CPUExecutionProvider"]
        )
    except _LOAD_ERRORS as exc:
        raise PrepareError(
            f"step {index} (model {step.model_name!r} version {step.model_version}) cannot be "
            f"loaded by ONNX Runtime: {_ort_message(exc)}"
        ) from exc


def _plan_inputs(model_name: str, label: str, session: Any) -> tuple[InputReader, ...]:
    args = session.get_inputs()
    if not args:
        raise PrepareError(f"{label} takes no inputs: there is nothing to feed it")
    single = len(args) == 1
    plans = []
    for arg in args:
        dtype = _ELEMENT_TYPES.get(arg.type)
        if dtype is None:
            raise PrepareError(
                f"{label} input {arg.name!r} is {arg.type}: the first step must take numeric "
                "tensors (float, double, integers or bool)"
            )
        dims = _dims(arg)
        row = None if dims is None else dims[1:]
        if single:
            columns = (TENSOR_COLUMN,) if arg.name == TENSOR_COLUMN else (TENSOR_COLUMN, arg.name)
            what = f"model {model_name!r}"
        else:
            columns, what = (arg.name,), f"model {model_name!r} input {arg.name!r}"
        batch = None if dims is None else dims[0]
        plans.append(InputReader(columns, arg.name, dtype, batch, row, what))
    return tuple(plans)


def _plan_steps(labels: list[str], sessions: Sequence[Any]) -> tuple[_Step, ...]:
    """Decide, for each step, which outputs it must return and how they feed the next step."""
    wanted: list[list[str]] = [[] for _ in sessions]
    feeds: list[list[tuple[str, int, tuple[int, ...] | None]]] = [[] for _ in sessions]
    last = sessions[-1].get_outputs()
    for out in last:
        if not out.type.startswith("tensor("):
            raise PrepareError(
                f"{labels[-1]} output {out.name!r} is {out.type}: only tensor outputs can be "
                "returned (convert scikit-learn classifiers with the zipmap option off)"
            )
    wanted[-1] = [out.name for out in last]
    for k in range(1, len(sessions)):
        outputs = sessions[k - 1].get_outputs()
        by_name = {out.name: out for out in outputs}
        inputs = sessions[k].get_inputs()
        if len(inputs) == 1:
            pairs = [(inputs[0], by_name.get(inputs[0].name, outputs[0]))]
        else:
            missing = [arg.name for arg in inputs if arg.name not in by_name]
            if missing:
                raise PrepareError(
                    f"{labels[k]} takes inputs {missing} that {labels[k - 1]} does not output "
                    f"(its outputs: {list(by_name)}); a multi-input step takes the previous "
                    "step's outputs by name"
                )
            pairs = [(arg, by_name[arg.name]) for arg in inputs]
        for arg, out in pairs:
            reshape = _check_link(labels[k - 1], out, labels[k], arg)
            if out.name not in wanted[k - 1]:
                wanted[k - 1].append(out.name)
            feeds[k].append((arg.name, wanted[k - 1].index(out.name), reshape))
    return tuple(
        _Step(label, session, outs, tuple(feed))
        for label, session, outs, feed in zip(labels, sessions, wanted, feeds, strict=True)
    )


def _check_link(out_label: str, out: Any, in_label: str, arg: Any) -> tuple[int, ...] | None:
    """Check that output `out` can feed input `arg`; return the row dims to reshape it to."""
    where = f"{in_label} input {arg.name!r}"
    source = f"{out_label} output {out.name!r}"
    if out.type != arg.type or not arg.type.startswith("tensor("):
        raise PrepareError(f"{where} takes {arg.type} but {source} gives {out.type}")
    out_dims, in_dims = _dims(out), _dims(arg)
    if out_dims is None or in_dims is None:
        return None
    out_row, in_row = out_dims[1:], in_dims[1:]
    out_static, in_static = _static(out_row), _static(in_row)
    if out_static is not None and in_static is not None:
        out_size, in_size = math.prod(out_static), math.prod(in_static)
        if out_size != in_size:
            raise PrepareError(
                f"{where} takes {in_size} value(s) per row but {source} gives {out_size}"
            )
        return None if out_static == in_static else in_static
    if len(out_row) == len(in_row):
        for o, i in zip(out_row, in_row, strict=True):
            if o is not None and i is not None and o != i:
                raise PrepareError(
                    f"{where} takes rows shaped {format_dims(in_row)} but {source} gives "
                    f"{format_dims(out_row)}"
                )
    return None


def _dims(arg: Any) -> Dims | None:
    # ORT reports an unknown rank as [] (indistinguishable from a scalar), symbolic dims as
    # strings and unknown dims as None.
    shape = arg.shape
    if not shape:
        return None
    return tuple(d if isinstance(d, int) and d >= 0 else None for d in shape)


def _tensor_info(arg: Any) -> TensorInfo:
    dims = _dims(arg) or ()
    return TensorInfo(arg.name, arg.type, tuple(-1 if d is None else d for d in dims))


def _static(dims: Dims) -> tuple[int, ...] | None:
    return None if None in dims else tuple(d for d in dims if d is not None)


def _ort_message(exc: BaseException) -> str:
    return _ORT_PREFIX.sub("", str(exc)).strip()
