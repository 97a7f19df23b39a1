"""Domain values <-> hotswap.v1 protobuf messages, for the control plane's servicers."""

from __future__ import annotations

from typing import Any

from hotswap.control.domain import (
    ModelVersion,
    Pipeline,
    PipelineVersion,
    TensorSpec,
    Workspace,
)
from hotswap.control.timeline import EngineStage, Swap
from hotswap.v1 import control_pb2, types_pb2


def tensor_spec(spec: TensorSpec) -> types_pb2.TensorSpec:
    return types_pb2.TensorSpec(name=spec.name, type=spec.type, shape=list(spec.shape))


def model_version(model: ModelVersion) -> types_pb2.ModelVersion:
    return types_pb2.ModelVersion(
        workspace=model.workspace,
        name=model.name,
        version=model.version,
        sha256=model.sha256,
        size_bytes=model.size_bytes,
        inputs=[tensor_spec(s) for s in model.inputs],
        outputs=[tensor_spec(s) for s in model.outputs],
        created_ms=model.created_ms,
        framework="onnx",
    )


def pipeline_version(version: PipelineVersion) -> types_pb2.PipelineVersion:
    return types_pb2.PipelineVersion(
        workspace=version.workspace,
        pipeline=version.pipeline,
        version_id=version.version_id,
        number=version.number,
        steps=[model_version(m) for m in version.steps],
        created_ms=version.created_ms,
    )


def workspace(ws: Workspace) -> control_pb2.Workspace:
    return control_pb2.Workspace(name=ws.name, created_ms=ws.created_ms)


def pipeline(p: Pipeline) -> control_pb2.Pipeline:
    message = control_pb2.Pipeline(
        workspace=p.workspace,
        name=p.name,
        created_ms=p.created_ms,
        updated_ms=p.updated_ms,
        version_count=p.version_count,
    )
    if p.deployment is not None:
        message.deployed.CopyFrom(pipeline_version(p.deployment.version))
        message.replicas = p.deployment.replicas
    return message


def enum_value(enum: Any, prefix: str, text: str) -> Any:
    """The enum member named `<prefix>_<TEXT>` (the typed twin of a string field)."""
    return enum.Value(f"{prefix}_{text.upper()}")


def serving_status(text: str) -> control_pb2.ServingStatus.ValueType:
    return enum_value(control_pb2.ServingStatus, "SERVING_STATUS", text)  # type: ignore[no-any-return]


def engine_stage(stage: EngineStage) -> control_pb2.EngineSwapTiming:
    return control_pb2.EngineSwapTiming(
        engine=stage.engine,
        address=stage.address,
        prepare_ms=stage.prepare_ms,
        fetch_ms=stage.fetch_ms,
        load_ms=stage.load_ms,
        warmup_ms=stage.warmup_ms,
        commit_ms=stage.commit_ms,
        switch_us=stage.switch_us,
        switched_at_us=stage.switched_at_us,
        reused=stage.reused,
        stage=stage.stage,
        stage_code=enum_value(control_pb2.SwapStage, "SWAP_STAGE", stage.stage),
        error=stage.error,
    )


def swap_in_progress(swap: Swap) -> control_pb2.SwapInProgress:
    return control_pb2.SwapInProgress(
        swap_id=swap.swap_id,
        target_version=swap.version_after,
        started_ms=swap.started_ms,
        engines=[engine_stage(e) for e in list(swap.engines.values())],
    )


def swap_record(swap: Swap) -> control_pb2.SwapRecord:
    return control_pb2.SwapRecord(
        swap_id=swap.swap_id,
        workspace=swap.workspace,
        pipeline=swap.pipeline,
        kind=swap.kind,
        version_before=swap.version_before,
        version_after=swap.version_after,
        started_ms=swap.started_ms,
        ended_ms=swap.ended_ms,
        outcome=swap.outcome,
        outcome_code=enum_value(control_pb2.SwapOutcome, "SWAP_OUTCOME", swap.outcome),
        reason=swap.reason,
        requested_by=swap.requested_by,
        request_id=swap.request_id,
        engines=[engine_stage(e) for e in swap.engines.values()],
        prepare_ms=swap.prepare_ms,
        commit_ms=swap.commit_ms,
    )
