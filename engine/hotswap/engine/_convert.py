"""hotswap.v1 messages <-> the engine's domain values."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hotswap.engine.host import ModelRef, PipelineState, SplitRef, VersionRef
from hotswap.engine.metrics import Bound
from hotswap.engine.runtime import LoadedPipeline, PipelineSpec, StepSpec
from hotswap.v1 import fleet_pb2, types_pb2

_KINDS = {
    types_pb2.StepSplit.KIND_RANDOM: "random",
    types_pb2.StepSplit.KIND_KEY: "key",
    types_pb2.StepSplit.KIND_SHADOW: "shadow",
}
_KIND_VALUES = {text: value for value, text in _KINDS.items()}


def _models(models: Iterable[types_pb2.ModelVersion]) -> tuple[ModelRef, ...]:
    return tuple(ModelRef(m.name, m.version, m.sha256) for m in models)


def version_ref(version: types_pb2.PipelineVersion) -> VersionRef:
    return VersionRef(
        workspace=version.workspace,
        pipeline=version.pipeline,
        version_id=version.version_id,
        number=version.number,
        models=_models(version.steps),
        splits=tuple(
            SplitRef(
                s.step,
                _KINDS.get(s.kind, f"kind {s.kind}"),  # refused, with its number, at prepare
                _models(s.models),
                tuple(s.weights),
                s.key,
                tuple(s.key_values),
            )
            for s in version.splits
        ),
    )


def _model_version(workspace: str, step: StepSpec) -> types_pb2.ModelVersion:
    return types_pb2.ModelVersion(
        workspace=workspace, name=step.model_name, version=step.model_version, sha256=step.sha256
    )


def pipeline_version(spec: PipelineSpec) -> types_pb2.PipelineVersion:
    """The inverse of `version_ref`, for a version this engine serves."""
    return types_pb2.PipelineVersion(
        workspace=spec.workspace,
        pipeline=spec.pipeline,
        version_id=spec.version_id,
        number=spec.number,
        steps=[_model_version(spec.workspace, s) for s in spec.steps],
        splits=[
            types_pb2.StepSplit(
                step=s.step,
                kind=_KIND_VALUES[s.kind],
                models=[_model_version(spec.workspace, m) for m in s.models],
                weights=s.weights,
                key=s.key,
                key_values=s.key_values,
            )
            for s in spec.splits
        ],
    )


def traffic(
    spec: PipelineSpec, counts: Iterable[tuple[int, int, StepSpec, Any]]
) -> list[types_pb2.ModelTraffic]:
    """`LoadedPipeline.traffic` as the Heartbeat carries it."""
    return [
        types_pb2.ModelTraffic(
            workspace=spec.workspace,
            pipeline=spec.pipeline,
            version_id=spec.version_id,
            step=step,
            arm=arm,
            model=model.model_name,
            model_version=model.model_version,
            sha256=model.sha256,
            requests=requests,
            rows=rows,
            errors=errors,
            elapsed_ns=elapsed_ns,
        )
        for step, arm, model, (requests, rows, errors, elapsed_ns) in counts
    ]


def version_traffic(spec: PipelineSpec, bound: Bound) -> fleet_pb2.VersionTraffic:
    """One version's request counts (`metrics.Bound`) as the Heartbeat carries them."""
    errors = sum(bound.failures.values())
    return fleet_pb2.VersionTraffic(
        workspace=spec.workspace,
        pipeline=spec.pipeline,
        version_id=spec.version_id,
        number=spec.number,
        requests=bound.ok + errors,
        errors=errors,
        seconds=bound.latency_sum,
    )


def served_models(loaded: LoadedPipeline) -> list[types_pb2.ServedModel]:
    return [
        types_pb2.ServedModel(name=s.model_name, version=s.model_version, sha256=s.sha256)
        for s in loaded.spec.steps
    ]


def failure_cause(cause: str) -> fleet_pb2.FailureCause.ValueType:
    """`PrepareError.cause` ("fetch", "build", ...) as the protocol's enum."""
    return fleet_pb2.FailureCause.Value(f"FAILURE_CAUSE_{cause.upper()}")


def serving_pipeline(state: PipelineState) -> fleet_pb2.ServingPipeline:
    workspace, pipeline = state.key.split("/", 1)
    message = fleet_pb2.ServingPipeline(
        workspace=workspace,
        pipeline=pipeline,
        state=state.state,
        pipeline_state=fleet_pb2.PipelineState.Value(f"PIPELINE_STATE_{state.state.upper()}"),
        error=state.error,
    )
    if state.active is not None:
        message.version_id = state.active.spec.version_id
        message.number = state.active.spec.number
        message.models.extend(served_models(state.active))
    return message
