"""Domain values <-> hotswap.v1 protobuf messages, for the control plane's servicers."""

from __future__ import annotations

from typing import Any

from hotswap.control.domain import (
    ModelVersion,
    Pipeline,
    PipelineVersion,
    Split,
    TensorSpec,
    Workspace,
)
from hotswap.control.rates import Rate
from hotswap.control.rollout import Rollout, Served
from hotswap.control.splits import SplitRequest
from hotswap.control.timeline import EngineStage, Swap
from hotswap.v1 import control_pb2, types_pb2


def tensor_spec(spec: TensorSpec) -> types_pb2.TensorSpec:
    return types_pb2.TensorSpec(name=spec.name, type=spec.type, shape=list(spec.shape))


def version_rate(rate: Rate) -> control_pb2.VersionRate:
    return control_pb2.VersionRate(
        number=rate.number,
        requests_per_second=rate.requests,
        errors_per_second=rate.errors,
        mean_latency_ms=rate.mean_latency_ms,
        engines=rate.engines,
    )


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


SPLIT_KINDS = {
    "random": types_pb2.StepSplit.KIND_RANDOM,
    "key": types_pb2.StepSplit.KIND_KEY,
    "shadow": types_pb2.StepSplit.KIND_SHADOW,
}


def split(s: Split) -> types_pb2.StepSplit:
    return types_pb2.StepSplit(
        step=s.step,
        kind=SPLIT_KINDS[s.kind],
        models=[model_version(m) for m in s.models],
        weights=s.weights,
        key=s.key,
        key_values=s.key_values,
    )


def split_request(ref: control_pb2.SplitRef) -> SplitRequest:
    kinds = {value: text for text, value in SPLIT_KINDS.items()}
    return SplitRequest(
        ref.step,
        kinds.get(ref.kind, ""),
        tuple((m.model, m.version) for m in ref.models),
        tuple(ref.weights),
        ref.key,
        tuple(ref.key_values),
    )


def pipeline_version(version: PipelineVersion) -> types_pb2.PipelineVersion:
    return types_pb2.PipelineVersion(
        workspace=version.workspace,
        pipeline=version.pipeline,
        version_id=version.version_id,
        number=version.number,
        steps=[model_version(m) for m in version.steps],
        created_ms=version.created_ms,
        splits=[split(s) for s in version.splits],
    )


def _traffic(served: Served, model: dict[str, str], step: int, arm: int) -> types_pb2.ModelTraffic:
    return types_pb2.ModelTraffic(
        step=step,
        arm=arm,
        model=model["name"],
        model_version=model["version"],
        requests=served.requests,
        rows=served.rows,
        errors=served.errors,
        elapsed_ns=served.elapsed_ns,
    )


def rollout(r: Rollout) -> control_pb2.Rollout:
    return control_pb2.Rollout(
        id=r.id,
        workspace=r.workspace,
        pipeline=r.pipeline,
        state=r.state,
        baseline_version=r.baseline_version,
        final_version=r.final_version,
        step=r.step,
        champion=types_pb2.ModelVersion(
            workspace=r.workspace, name=r.champion["name"], version=r.champion["version"]
        ),
        challenger=types_pb2.ModelVersion(
            workspace=r.workspace, name=r.challenger["name"], version=r.challenger["version"]
        ),
        percents=r.percents,
        step_seconds=r.step_seconds,
        max_error_rate=r.max_error_rate,
        max_latency_ratio=r.max_latency_ratio,
        min_requests=r.min_requests,
        steps=[
            control_pb2.RolloutStep(
                percent=s.percent,
                version=s.version,
                started_ms=s.started_ms,
                ended_ms=s.ended_ms,
                outcome=s.outcome,
                champion=_traffic(s.champion, r.champion, r.step, 0),
                challenger=_traffic(s.challenger, r.challenger, r.step, 1),
                reason=s.reason,
            )
            for s in r.steps
        ],
        reason=r.reason,
        started_ms=r.started_ms,
        ended_ms=r.ended_ms,
        requested_by=r.requested_by,
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
        note=swap.note,
    )
