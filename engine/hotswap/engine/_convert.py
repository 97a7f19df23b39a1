"""hotswap.v1 messages <-> the engine's domain values."""

from __future__ import annotations

from hotswap.engine.host import ModelRef, PipelineState, VersionRef
from hotswap.engine.runtime import LoadedPipeline, PipelineSpec
from hotswap.v1 import fleet_pb2, types_pb2


def version_ref(version: types_pb2.PipelineVersion) -> VersionRef:
    return VersionRef(
        workspace=version.workspace,
        pipeline=version.pipeline,
        version_id=version.version_id,
        number=version.number,
        models=tuple(ModelRef(m.name, m.version, m.sha256) for m in version.steps),
    )


def pipeline_version(spec: PipelineSpec) -> types_pb2.PipelineVersion:
    """The inverse of `version_ref`, for a version this engine serves."""
    return types_pb2.PipelineVersion(
        workspace=spec.workspace,
        pipeline=spec.pipeline,
        version_id=spec.version_id,
        number=spec.number,
        steps=[
            types_pb2.ModelVersion(
                workspace=spec.workspace,
                name=s.model_name,
                version=s.model_version,
                sha256=s.sha256,
            )
            for s in spec.steps
        ],
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
