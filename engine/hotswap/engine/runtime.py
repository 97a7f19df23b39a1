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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias, TypeVar, cast

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
from hotswap.engine.model_process import ProcessSession
from hotswap.engine.splits import ArmModel, ModelStats, Router, SplitSpec, model_label

__all__ = [
    "TENSOR_COLUMN",
    "LoadedPipeline",
    "PipelineSpec",
    "RuntimeOptions",
    "SplitSpec",
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

# The default size from which a model is served by a process of its own: the tutorial's
# models (~0.2 MB) stay in the engine; a 9 MB ensemble already stalled serving 15 ms when
# built or freed in it (docs/adr/0010).
ISOLATE_BYTES = 8 * 1024**2

# Timed 1-row inferences after the first (allocating) one, to learn a request's real cost.
WARM_RUNS = 3

_Kept = TypeVar("_Kept")

StepSpec = ArmModel
"""One step of a pipeline version: a model version and its local, sha-verified ONNX file."""


@dataclass(frozen=True, slots=True)
class PipelineSpec:
    """A pipeline version to serve: its identity (echoed in every response), its steps, and
    the steps of several models (`splits`, whose first model is the step's)."""

    workspace: str
    pipeline: str
    version_id: str
    number: int
    steps: tuple[StepSpec, ...]
    splits: tuple[SplitSpec, ...] = ()

    def models(self) -> list[StepSpec]:
        """Every model the version runs: the steps' and the splits' other models."""
        return [*self.steps, *(m for split in self.splits for m in split.models[1:])]


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """ONNX Runtime threading. 0 means ONNX Runtime's default (one thread per core).

    One intra-op thread maximises 1-row throughput on small machines; more threads help large
    batches (design.md, performance notes), so the engine makes this configurable.
    """

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    # Models whose file is at least this many bytes are served from a process of their own
    # (`model_process`), so that building and freeing them never stalls serving; None: none.
    isolate_bytes: int | None = ISOLATE_BYTES

    def __post_init__(self) -> None:
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ValueError("thread counts must be >= 0 (0 = ONNX Runtime's default)")
        if self.isolate_bytes is not None and self.isolate_bytes < 0:
            raise ValueError("isolate_bytes must be >= 0 (or None: no model process)")


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


@dataclass(frozen=True, slots=True)
class _Arm:
    """One model of a split step, fed as the step's first model is (inputs matched by
    position), returning its outputs in the first model's order."""

    step: _Step
    renames: tuple[tuple[str, str], ...]  # (the first model's input name, this one's)
    model: StepSpec
    label: str  # model_label(model), as `out._model_split` names it
    stats: ModelStats

    def run(self, feed: Mapping[str, Array]) -> list[Array]:
        return self.step.run({mine: feed[theirs] for theirs, mine in self.renames})


@dataclass(frozen=True, slots=True)
class _SplitStep:
    """A step of several models; `run` serves each row with the model `router` picks (or,
    for a shadow step, every row with the champion)."""

    label: str
    kind: str
    arms: tuple[_Arm, ...]
    router: Router | None  # None for a shadow step
    feeds: tuple[tuple[str, int, tuple[int, ...] | None], ...]  # as _Step.feeds
    outputs: list[str]  # as _Step.outputs (the first model's names)
    labels: pa.Array  # each model's `out._model_split` entry
    # Shadow steps: each challenger's log columns and their Arrow types (None when dynamic).
    shadow_columns: list[list[tuple[str, pa.DataType | None]]]

    def run(self, feed: dict[str, Array], order: Array | int, n: int) -> list[Array]:
        if isinstance(order, int):
            return _timed(self.arms[order], feed, n)
        outputs: list[Array] = []
        for arm in np.unique(order).tolist():
            rows = np.flatnonzero(order == arm)
            part = _timed(self.arms[arm], {k: v[rows] for k, v in feed.items()}, len(rows))
            if not outputs:
                outputs = [np.empty((n, *v.shape[1:]), v.dtype) for v in part]
            try:
                for whole, value in zip(outputs, part, strict=True):
                    whole[rows] = value
            except ValueError as exc:
                raise RuntimeError(
                    f"{self.label}: model {self.arms[arm].model.model_name!r} gave outputs "
                    f"shaped unlike the others' ({exc})"
                ) from exc
        return outputs


def _timed(arm: _Arm, feed: dict[str, Array], rows: int) -> list[Array]:
    started = time.perf_counter_ns()
    try:
        outputs = arm.run(feed)
    except BaseException:
        arm.stats.record(rows, time.perf_counter_ns() - started, failed=True)
        raise
    arm.stats.record(rows, time.perf_counter_ns() - started, failed=False)
    return outputs


@dataclass(frozen=True, slots=True)
class ShadowRun:
    """A shadow step's input for one request, run by the inference log's writer (`run`)."""

    step: _SplitStep
    feed: dict[str, Array]
    rows: int


class Shadows:
    """The shadow runs of one request. Their log columns are made once, by `shadow_columns`,
    when the log first needs them (a flush or a query), off the request path."""

    __slots__ = ("batch", "index", "runs")

    def __init__(self, runs: list[ShadowRun]) -> None:
        self.runs = runs
        self.batch: _ShadowBatch | None = None  # the run that made this request's columns
        self.index = 0  # this request's place in it

    @property
    def rows(self) -> int:
        return self.runs[0].rows


@dataclass(frozen=True, slots=True)
class _ShadowBatch:
    """The shadow columns of requests run together: `out_<challenger>.<output>`,
    `metadata.shadow_elapsed`, `metadata.shadow_errors`, and where each request starts."""

    columns: dict[str, pa.Array]
    starts: Array  # row offsets, one per request and one past the end


def shadow_columns(requests: Sequence[Shadows]) -> dict[str, pa.Array]:
    """The shadow columns of requests of one version and request shape, in row order.

    Each challenger runs once on all the requests not run yet, their rows put together: one
    ONNX Runtime call and a few Arrow arrays instead of a set a request (a run a request cost
    the champion half its 1-row throughput on 2 cores). A batch that fails runs again
    request by request, so a failure is charged to the requests that cause it.
    `metadata.shadow_elapsed` gives each request its rows' share of its batch's time.
    """
    todo = [r for r in requests if r.batch is None]
    if todo:
        _run_shadows(todo)
    first = cast(_ShadowBatch, requests[0].batch)
    if len(requests) == len(first.starts) - 1 and all(
        r.batch is first and r.index == i for i, r in enumerate(requests)
    ):
        return first.columns  # the usual case: the flush ran exactly these requests
    pieces = []
    for r in requests:
        batch = cast(_ShadowBatch, r.batch)
        start, end = int(batch.starts[r.index]), int(batch.starts[r.index + 1])
        pieces.append({k: v.slice(start, end - start) for k, v in batch.columns.items()})
    return {name: pa.concat_arrays([p[name] for p in pieces]) for name in pieces[0]}


def _run_shadows(requests: list[Shadows]) -> None:
    sizes = np.fromiter((r.rows for r in requests), np.int64, len(requests))
    total = int(sizes.sum())
    starts = np.concatenate([[0], np.cumsum(sizes)])
    columns: dict[str, pa.Array] = {}
    elapsed: list[dict[str, int]] = [{} for _ in requests]
    errors: list[dict[str, str]] = [{} for _ in requests]
    for j, first in enumerate(requests[0].runs):
        step = first.step
        feed = {
            key: np.concatenate([r.runs[j].feed[key] for r in requests])
            if len(requests) > 1
            else value
            for key, value in first.feed.items()
        }
        for arm, names in zip(step.arms[1:], step.shadow_columns, strict=True):
            name = arm.model.model_name
            started = time.perf_counter_ns()
            arrays, failed = _shadow_run(arm, names, feed, total)
            took = time.perf_counter_ns() - started
            if failed and len(requests) > 1:
                # Request by request: which of them fail, and the others' real answers.
                parts = []
                for i, r in enumerate(requests):
                    started = time.perf_counter_ns()
                    part, why = _shadow_run(arm, names, r.runs[j].feed, int(sizes[i]))
                    elapsed[i][name] = time.perf_counter_ns() - started
                    arm.stats.record(int(sizes[i]), elapsed[i][name], bool(why))
                    parts.append(part)
                    if why:
                        errors[i][name] = why
                arrays = [pa.concat_arrays(list(c)) for c in zip(*parts, strict=True)]
            else:
                arm.stats.record_many(len(requests), total, took, len(requests) * bool(failed))
                for i in range(len(requests)):
                    elapsed[i][name] = took * int(sizes[i]) // max(total, 1)
                    if failed:
                        errors[i][name] = failed
            for (column, _), array in zip(names, arrays, strict=True):
                columns[column] = array
    # One JSON value a request, repeated over its rows.
    rows = pa.array(np.repeat(np.arange(len(requests)), sizes))
    columns["metadata.shadow_elapsed"] = pa.array([json.dumps(e) for e in elapsed]).take(rows)
    columns["metadata.shadow_errors"] = pa.array(
        [json.dumps(e) if e else None for e in errors], pa.string()
    ).take(rows)
    batch = _ShadowBatch(columns, starts)
    for i, request in enumerate(requests):
        request.batch, request.index = batch, i


def _shadow_run(
    arm: _Arm, names: list[tuple[str, pa.DataType | None]], feed: dict[str, Array], n: int
) -> tuple[list[pa.Array], str]:
    """One challenger's columns on `feed` and why it failed ("" when it ran): a failure
    gives nulls of the columns' types, and never reaches a caller."""
    try:
        values = arm.run(feed)
        if any(v.ndim == 0 or v.shape[0] != n for v in values):
            raise InvalidInput("it did not return one row per input row")
        arrays = [ndarray_to_arrow(v) for v in values]
        failed = ""
    except Exception as exc:  # a challenger's failure is logged, not raised
        failed = (str(exc) or type(exc).__name__)[:500]
        arrays = [pa.nulls(n, type_ or pa.null()) for _, type_ in names]
    return [
        pa.nulls(n, type_) if type_ is not None and a.type != type_ else a  # unforeseen shapes
        for (_, type_), a in zip(names, arrays, strict=True)
    ], failed


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
        "_first",
        "_inputs",
        "_kept",
        "_last_label",
        "_later",
        "_metadata",
        "_out_columns",
        "_out_names",
        "_routed",
        "_schema_cache",
        "_steps",
        "_templates",
        "identity",
        "isolated",
        "load_ms",
        "row_ms",
        "spec",
        "warmup_ms",
    )

    spec: PipelineSpec
    load_ms: float
    warmup_ms: float
    row_ms: float  # steady-state time of a 1-row inference, measured at warm-up
    isolated: bool  # some model runs in a process of its own (a call waits on a socket)

    def __init__(
        self,
        spec: PipelineSpec,
        sessions: Sequence[Any],
        load_ms: float,
        split_sessions: Sequence[Sequence[Any]] = (),
    ) -> None:
        """Plan a pipeline over already-built sessions (`split_sessions`: those of each
        split's models after the first); use `build` instead."""
        self.spec = spec
        self.load_ms = load_ms
        self.warmup_ms = 0.0
        self.row_ms = math.inf
        every = [*sessions, *(s for others in split_sessions for s in others)]
        self.isolated = any(isinstance(s, ProcessSession) for s in every)
        labels = [f"step {i} (model {s.model_name!r})" for i, s in enumerate(spec.steps)]
        self._inputs = _plan_inputs(spec.steps[0].model_name, labels[0], sessions[0])
        steps: list[_Step | _SplitStep] = list(_plan_steps(labels, sessions))
        for split, others in zip(spec.splits, split_sessions, strict=True):
            if not 0 <= split.step < len(steps):
                raise PrepareError(
                    f"a split names step {split.step} of a {len(steps)}-step pipeline"
                )
            steps[split.step] = _split_step(spec, split, steps[split.step], others)
        self._steps = tuple(steps)
        routed = [s for s in steps if isinstance(s, _SplitStep)]
        self._routed = tuple(routed) if routed else None
        # The plain chain `_run` walks (a version without split steps): no type checks a call.
        plain = [s for s in steps if isinstance(s, _Step)] if not routed else []
        self._first: _Step | None = plain[0] if plain else None
        self._later = tuple(plain[1:])
        self._last_label = labels[-1]
        self._out_names = self._steps[-1].outputs
        self._out_columns = [f"out.{name}" for name in self._out_names]
        if any(s.router is not None for s in routed):
            self._out_columns.append(SPLIT_COLUMN)
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
        # What served an answer, as every answer names it: the result's Arrow schema metadata
        # here, the HTTP answers' x-hotswap-* headers (engine/http.py).
        self.identity = {
            "hotswap.workspace": spec.workspace,
            "hotswap.pipeline": spec.pipeline,
            "hotswap.pipeline_version": str(spec.number),
            "hotswap.pipeline_version_id": spec.version_id,
            "hotswap.models": json.dumps(models),
        }
        # What protocols build once per version (`kept`), by the function that builds it.
        self._kept: dict[Callable[[LoadedPipeline], Any], Any] = {}
        self._metadata = pa.KeyValueMetadata(
            {key.encode(): value.encode() for key, value in self.identity.items()}
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
        opened = dict(reuse or {})

        def session(index: int, model: StepSpec) -> Any:
            found = opened.get(model.sha256)
            if found is None:
                found = opened[model.sha256] = _open_session(index, model, options)
            return found

        sessions = [session(i, step) for i, step in enumerate(spec.steps)]
        others = [[session(s.step, m) for m in s.models[1:]] for s in spec.splits]
        pipeline = cls(spec, sessions, (time.perf_counter() - started) * 1000, others)
        if warm_up:
            started = time.perf_counter()
            pipeline._warm_up()
            pipeline.warmup_ms = (time.perf_counter() - started) * 1000
        return pipeline

    def sessions_by_sha(self) -> dict[str, Any]:
        """This version's ONNX Runtime sessions by model sha256 (for reuse by other versions)."""
        found: dict[str, Any] = {}
        for model, step in zip(self.spec.steps, self._steps, strict=True):
            if isinstance(step, _SplitStep):
                found.update((arm.model.sha256, arm.step.session) for arm in step.arms)
            else:
                found[model.sha256] = step.session
        return found

    @property
    def healthy(self) -> bool:
        """Every model can serve: none is in a process of its own that is down."""
        return all(usable(session) for session in self.sessions_by_sha().values())

    def traffic(self) -> list[tuple[int, int, StepSpec, tuple[int, int, int, int]]]:
        """What each model of a split or shadow step served since this version was loaded:
        (step, model index, model, (requests, rows, errors, elapsed ns))."""
        return [
            (split.step, i, arm.model, arm.stats.snapshot())
            for split, step in zip(self.spec.splits, self._routed or (), strict=True)
            for i, arm in enumerate(step.arms)
        ]

    def key_columns(self) -> frozenset[str]:
        """The request columns the version's split steps read besides the model inputs."""
        return frozenset(s.router.key for s in self._routed or () if s.router and s.router.key)

    def input_columns(self) -> list[str]:
        """The columns the first step reads, e.g. `["tensor"]`."""
        return [plan.columns[0] for plan in self._inputs]

    def input_specs(self) -> list[TensorInfo]:
        """The first step's ONNX inputs, in order: the pipeline's inputs."""
        return [_tensor_info(arg) for arg in _session(self._steps[0]).get_inputs()]

    def output_specs(self) -> list[TensorInfo]:
        """The last step's ONNX outputs, in order: the `out.<name>` columns of a result."""
        by_name = {arg.name: arg for arg in _session(self._steps[-1]).get_outputs()}
        return [_tensor_info(by_name[name]) for name in self._out_names]

    def infer(self, rows: pa.RecordBatch | pa.Table) -> pa.RecordBatch:
        """Run every step on the rows and return the result rows (design.md).

        Raises:
            InvalidInput: the rows cannot feed the first step (missing column, wrong width,
                non-numeric values, nulls, ragged rows, no rows), or a step rejected the data.
        """
        return self.infer_traced(rows)[0]

    def infer_traced(
        self, rows: pa.RecordBatch | pa.Table
    ) -> tuple[pa.RecordBatch, Shadows | None]:
        """`infer`, with the request's shadow runs (for the inference log to run) if any."""
        batch = as_batch(rows)
        n = batch.num_rows
        if n == 0:
            raise InvalidInput("the table has no rows: send at least one")
        epoch_ms = time.time_ns() // 1_000_000
        feed = {plan.input_name: plan.tensor(batch, n) for plan in self._inputs}
        if self._routed is None:
            return self._result(epoch_ms, batch.columns, batch.schema, self._run(feed, n)), None
        outputs, split, shadows = self._run_routed(feed, n, lambda key: _key_column(batch, key))
        return self._result(epoch_ms, batch.columns, batch.schema, outputs, split), shadows

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
        # Plain loops, not generators: this runs for every request, and a generator's frame
        # costs more than the look-ups themselves.
        feed = {}
        for plan in self._inputs:
            for column in plan.columns:
                values = columns.get(column)
                if values is not None:
                    feed[plan.input_name] = plan.array(values, column)
                    break
            else:
                raise InvalidInput(f"no column {plan.columns[0]!r} ({plan.what} reads it)")
        n = next(iter(feed.values())).shape[0]
        epoch_ms = time.time_ns() // 1_000_000
        if self._routed is None:
            return Inferred(self, epoch_ms, columns, self._run(feed, n), schema)
        outputs, split, shadows = self._run_routed(feed, n, columns.get)
        return Inferred(self, epoch_ms, columns, outputs, schema, split, shadows)

    def kept(self, make: Callable[[LoadedPipeline], _Kept]) -> _Kept:
        """`make(self)`, built on first use and kept as long as this version: what a protocol
        prepares once per version, such as the parts every answer shares."""
        found = self._kept.get(make)
        if found is None:  # threads racing here each build one; the last is kept
            found = self._kept[make] = make(self)
        return cast(_Kept, found)

    @property
    def plain_input(self) -> InputReader | None:
        """The one input of a version that a protocol may feed as is (`infer_tensor`): one
        input with a static row shape and no fixed batch, no split or shadow steps; else None."""
        if self._routed is not None or len(self._inputs) != 1:
            return None
        reader = self._inputs[0]
        return reader if reader.static_row is not None and reader.batch is None else None

    def infer_tensor(self, values: Array) -> Inferred:
        """`infer_arrays` for a version with a `plain_input`, given its tensor already of the
        model's dtype and shaped `[rows, *plain_input.static_row]` (rows > 0): nothing to
        find, check or cast."""
        reader = self._inputs[0]
        epoch_ms = time.time_ns() // 1_000_000
        outputs = self._run({reader.input_name: values}, values.shape[0])
        return Inferred(self, epoch_ms, {reader.columns[0]: values}, outputs)

    def takes(self, columns: Mapping[str, Array]) -> bool:
        """Whether `columns` has a column for every input."""
        for plan in self._inputs:
            for column in plan.columns:
                if column in columns:
                    break
            else:
                return False
        return True

    def answer(self, inferred: Inferred, layout: RequestLayout, exclude: frozenset[str]) -> bytes:
        """The answer to a request `fast_ipc` read: the template of this version, request
        schema, row count and exclusion with this request's values in place, or (the first
        time, for outputs a template cannot hold, or rows split between models) encoded from
        the result rows."""
        if self._routed is not None:
            return self.encode(inferred.batch(), exclude)
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
        outputs = cast(_Step, self._first).run(feed)  # set: `_run` serves unrouted versions
        for step in self._later:
            outputs = step.run(_next_feed(step, outputs))
        self._check_rows(outputs, n)
        return outputs

    def _run_routed(
        self, feed: dict[str, Array], n: int, keys: Callable[[str], Any]
    ) -> tuple[list[Array], pa.Array | None, Shadows | None]:
        """`_run` for a version with split or shadow steps: also each row's models (the
        `out._model_split` column) and the shadow runs the log is to make."""
        outputs: list[Array] = []
        chosen: list[tuple[_SplitStep, Array | int]] = []
        shadows: list[ShadowRun] = []
        for i, step in enumerate(self._steps):
            if i:
                feed = _next_feed(step, outputs)
            if isinstance(step, _Step):
                outputs = step.run(feed)
            elif step.router is None:
                outputs = _timed(step.arms[0], feed, n)
                shadows.append(ShadowRun(step, feed, n))
            else:
                order = step.router.route(keys(step.router.key) if step.router.key else None, n)
                outputs = step.run(feed, order, n)
                chosen.append((step, order))
        self._check_rows(outputs, n)
        return outputs, _split_column(chosen, n), Shadows(shadows) if shadows else None

    def _check_rows(self, outputs: list[Array], n: int) -> None:
        for name, value in zip(self._out_names, outputs, strict=True):
            if value.ndim == 0 or value.shape[0] != n:
                raise InvalidInput(
                    f"{self._last_label} output {name!r} has shape {list(value.shape)} for a "
                    f"{n}-row request: the model does not return one row per input row"
                )

    def _result(
        self,
        epoch_ms: int | Array,
        inputs: list[pa.Array],
        in_schema: pa.Schema,
        outputs: list[Array],
        split: pa.Array | None = None,
    ) -> pa.RecordBatch:
        """The result rows: time (one instant, or one per row), the inputs echoed, the
        outputs, the models that served each row (for split steps), check_failures."""
        n = len(outputs[0])
        columns = [timestamp_column(epoch_ms, n), *inputs]
        columns += [ndarray_to_arrow(value) for value in outputs]
        if split is not None:
            columns.append(split)
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
            self._warm_once(table)
            # The first call allocates; later ones show what a small request really costs.
            for _ in range(WARM_RUNS):
                started = time.perf_counter()
                self._warm_once(table)
                self.row_ms = min(self.row_ms, (time.perf_counter() - started) * 1000)
        except (EngineError, RuntimeError, ValueError) as exc:
            raise WarmupFailed(f"warm-up inference on a zero-filled row failed: {exc}") from exc
        for step in self._routed or ():
            for arm in step.arms:
                arm.stats.reset()  # the warm-up is not traffic

    def _warm_once(self, table: pa.RecordBatch) -> None:
        """One warm-up inference; a split or shadow step runs every one of its models (a
        warm-up has no key column, and each model must be proven before it serves)."""
        if self._routed is None:
            self.infer(table)
            return
        n = table.num_rows
        feed = {plan.input_name: plan.tensor(table, n) for plan in self._inputs}
        outputs: list[Array] = []
        for i, step in enumerate(self._steps):
            if i:
                feed = _next_feed(step, outputs)
            if isinstance(step, _Step):
                outputs = step.run(feed)
                continue
            results = [arm.run(feed) for arm in step.arms]
            outputs = results[0]
            if step.router is not None:
                step.run(feed, np.arange(n) % len(step.arms), n)  # the scatter, once
        self._check_rows(outputs, n)


class Inferred:
    """The outcome of `infer_arrays`: the output arrays now, the result rows on demand."""

    __slots__ = (
        "_batch",
        "_epoch_ms",
        "_inputs",
        "_loaded",
        "_schema",
        "_split",
        "num_rows",
        "outputs",
        "shadows",
    )

    def __init__(
        self,
        loaded: LoadedPipeline,
        epoch_ms: int,
        inputs: Mapping[str, Array],
        outputs: list[Array],
        schema: pa.Schema | None = None,
        split: pa.Array | None = None,
        shadows: Shadows | None = None,
    ) -> None:
        self._loaded = loaded
        self._epoch_ms = epoch_ms
        self._inputs = inputs
        self._schema = schema
        self._split = split
        self.shadows = shadows
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
        return self._loaded._result(times, arrays, schema, self.outputs, self._split)

    def split_labels(self) -> Array | None:
        """Each row's models (`out._model_split`) as a [rows, split steps] array of their
        JSON labels, or None for a version without random or key splits."""
        if self._split is None:
            return None
        labels = self._split.flatten().to_numpy(zero_copy_only=False)
        return np.asarray(labels, dtype=object).reshape(self.num_rows, -1)

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
        split = None if first._split is None else pa.concat_arrays([r._split for r in run])
        merged = Inferred(first._loaded, 0, inputs, outputs, first._schema, split)
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


SPLIT_COLUMN = "out._model_split"
"""Which model served each row: a list, one entry per split step, of Wallaroo's JSON."""


def _session(step: _Step | _SplitStep) -> Any:
    """The step's (first) model's session: the one that decides its inputs and outputs."""
    return step.arms[0].step.session if isinstance(step, _SplitStep) else step.session


def _key_column(batch: pa.RecordBatch, key: str) -> pa.Array | None:
    """A request's split key column, None when it has none.

    Raises:
        InvalidInput: the request has several columns of that name.
    """
    index = batch.schema.get_field_index(key)
    if index >= 0:
        return batch.column(index)
    count = batch.schema.names.count(key)
    if count:
        raise InvalidInput(f"the request has {count} columns named {key!r}: send one")
    return None


def _next_feed(step: _Step | _SplitStep, outputs: list[Array]) -> dict[str, Array]:
    feed = {}
    for name, source, row in step.feeds:
        value = outputs[source]
        feed[name] = value if row is None else value.reshape(value.shape[0], *row)
    return feed


def _split_column(chosen: list[tuple[_SplitStep, Array | int]], n: int) -> pa.Array | None:
    """`out._model_split`: for each row, the label of the model each split step chose."""
    if not chosen:
        return None
    parts = []
    for step, order in chosen:
        index = np.full(n, order, np.int32) if isinstance(order, int) else order.astype(np.int32)
        parts.append(step.labels.take(pa.array(index)))
    values = parts[0]
    if len(parts) > 1:  # row-major: row 0's entries, then row 1's...
        interleave = np.arange(n * len(parts)).reshape(len(parts), n).T.reshape(-1)
        values = pa.concat_arrays(parts).take(pa.array(interleave))
    offsets = pa.array(np.arange(0, n * len(parts) + 1, len(parts), dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, values)


def _arm_label(step: int, model: StepSpec) -> str:
    return f"step {step} (model {model.model_name!r})"


def _split_step(
    spec: PipelineSpec, split: SplitSpec, first: _Step | _SplitStep, sessions: Sequence[Any]
) -> _SplitStep:
    """The split step of `split`, over its first model's planned step and the sessions of
    the others. Every model must take the first one's inputs (by position: names may
    differ); a split's models must also give its outputs, as one result holds their rows."""
    label = f"step {split.step} ({split.kind} split)"
    problem = split.check()
    if not problem and split.models[0].sha256 != spec.steps[split.step].sha256:
        problem = f"step {split.step}'s split does not start with the step's model"
    names = [m.model_name for m in split.models]
    # A key split may send several values to one model; the other kinds name each model once
    # (a shadow's columns are named after its models).
    if not problem and split.kind != "key" and len(set(names)) != len(names):
        problem = f"step {split.step}'s split names a model twice ({', '.join(names)})"
    if problem or not isinstance(first, _Step):
        raise PrepareError(problem or f"step {split.step} has two splits")
    base = first.session
    arms = [_Arm(first, tuple((a.name, a.name) for a in base.get_inputs()), split.models[0],
                 model_label(split.models[0]), ModelStats())]  # fmt: skip
    shadow_columns = []
    for model, session in zip(split.models[1:], sessions, strict=True):
        where = f"{label}: model {model.model_name!r}"
        renames = _match_args(where, "inputs", base.get_inputs(), session.get_inputs())
        if split.kind == "shadow":
            outputs = session.get_outputs()
            for out in outputs:
                if not out.type.startswith("tensor("):
                    raise PrepareError(f"{where} output {out.name!r} is {out.type}, not a tensor")
            outs = [out.name for out in outputs]
            shadow_columns.append(
                [(f"out_{model.model_name}.{out.name}", _arrow_type(out)) for out in outputs]
            )
        else:
            # Its outputs by position, in the order the first model's are asked for.
            mine = dict(_match_args(where, "outputs", base.get_outputs(), session.get_outputs()))
            outs = [mine[name] for name in first.outputs]
        step = _Step(_arm_label(split.step, model), session, outs, ())
        arms.append(_Arm(step, renames, model, model_label(model), ModelStats()))
    return _SplitStep(
        label,
        split.kind,
        tuple(arms),
        None if split.kind == "shadow" else Router(split, label),
        first.feeds,
        first.outputs,
        pa.array([arm.label for arm in arms], pa.string()),
        shadow_columns,
    )


def _match_args(
    where: str, what: str, theirs: Sequence[Any], mine: Sequence[Any]
) -> tuple[tuple[str, str], ...]:
    """Pairs (first model's name, this model's name) of inputs or outputs by position, with
    the same types and row shapes."""
    if len(theirs) != len(mine):
        raise PrepareError(
            f"{where} has {len(mine)} {what}, the step's first model {len(theirs)}: every "
            "model of a split takes and gives what the first does"
        )
    for a, b in zip(theirs, mine, strict=True):
        a_dims, b_dims = _dims(a), _dims(b)
        rows_differ = (
            a_dims is not None and b_dims is not None
            and _static(a_dims[1:]) is not None and _static(b_dims[1:]) is not None
            and a_dims[1:] != b_dims[1:]
        )  # fmt: skip
        if a.type != b.type or rows_differ:
            raise PrepareError(
                f"{where} {what[:-1]} {b.name!r} is {b.type} {format_dims(b_dims or ())}, but the "
                f"step's first model's {a.name!r} is {a.type} {format_dims(a_dims or ())}"
            )
    return tuple((a.name, b.name) for a, b in zip(theirs, mine, strict=True))


def _arrow_type(arg: Any) -> pa.DataType | None:
    """The Arrow type an output's values take in a result, when its row shape is static."""
    dtype = _ELEMENT_TYPES.get(arg.type)
    dims = _dims(arg)
    if dtype is None or dims is None:
        return None
    row = _static(dims[1:])
    return None if row is None else ndarray_to_arrow(np.zeros((1, *row), dtype)).type


def _open_session(index: int, step: StepSpec, options: RuntimeOptions) -> Any:
    model = f"model {step.model_name!r} version {step.model_version}"
    if options.isolate_bytes is not None and _size(step.path) >= options.isolate_bytes:
        try:
            return ProcessSession(
                step.path, model, options.intra_op_threads, options.inter_op_threads
            )
        except (OSError, RuntimeError) as exc:
            raise PrepareError(
                f"step {index} ({model}) cannot be loaded by ONNX Runtime in a process of its "
                f"own: {_ort_message(exc)}"
            ) from exc
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
            f"step {index} ({model}) cannot be loaded by ONNX Runtime: {_ort_message(exc)}"
        ) from exc


def usable(session: Any) -> bool:
    """Whether a session can serve a new version: a model process that is down (restarting,
    or given up) cannot."""
    return not isinstance(session, ProcessSession) or session.healthy


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # ONNX Runtime's own load then says what is wrong with the path


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
