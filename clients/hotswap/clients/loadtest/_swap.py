"""Swaps while the load runs: CreatePipelineVersion + Deploy, cycling through `models`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

from hotswap.clients._rpc import Security, open_channel
from hotswap.v1 import control_pb2, control_pb2_grpc


@dataclass
class SwapPlan:
    control: str
    workspace: str
    pipeline: str
    models: list[str]
    every: float
    count: int | None = None  # stop swapping after this many
    stop_load_after: bool = False  # end the load shortly after the last swap
    on_swap: Callable[[int], None] | None = None  # called after each swap (e.g. sample RSS)
    security: Security = field(default_factory=Security)


@dataclass
class SwapRecord:
    index: int
    model: str
    version: int = 0
    start_s: float = 0.0  # Deploy sent, seconds since the load's t0
    end_s: float = 0.0  # Deploy answered
    create_ms: float = 0.0
    deploy_ms: float = 0.0  # deploy() round trip seen by the client
    prepare_ms: float = 0.0  # the server's figures from DeployResponse
    commit_ms: float = 0.0
    server_total_ms: float = 0.0
    switch_us: float = 0.0  # the slowest engine's reference swap
    fetch_ms: float = 0.0  # the slowest engine's blob fetch (0 when cached)
    load_ms: float = 0.0  # the slowest engine's session build
    reused: bool = False
    error: str = ""
    window: dict[str, float] = field(default_factory=dict)
    served: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def endpoints(
    control: str, workspace: str, pipeline: str, security: Security | None = None
) -> tuple[list[str], int]:
    """The engines serving the deployed version now, and that version's number."""
    with open_channel(control, security) as channel:
        stub: Any = control_pb2_grpc.ControlPlaneStub(channel)  # type: ignore[arg-type]
        found = stub.GetPipelineEndpoints(
            control_pb2.GetPipelineEndpointsRequest(workspace=workspace, pipeline=pipeline),
            timeout=10,
        )
        return list(found.addresses), int(found.version)


def restore(plan: SwapPlan, version: int) -> str:
    """Puts the pipeline back on `version` (the one the load test found) after its swaps;
    returns a sentence saying what the run changed."""
    name = plan.pipeline
    with open_channel(plan.control, plan.security) as channel:
        stub: Any = control_pb2_grpc.ControlPlaneStub(channel)  # type: ignore[arg-type]
        try:
            found = stub.GetPipeline(
                control_pb2.GetPipelineRequest(workspace=plan.workspace, name=name), timeout=30
            )
            if found.deployed.number == version:
                return f"pipeline {name!r} is on version {version}, as it was"
            stub.Deploy(
                control_pb2.DeployRequest(
                    workspace=plan.workspace,
                    pipeline=name,
                    version=version,
                    requested_by="hotswap loadtest (restore)",
                ),
                timeout=120,
            )
        except grpc.RpcError as exc:
            return (
                f"could not put pipeline {name!r} back on version {version} "
                f"({exc.code().name}: {exc.details()}): run "
                f"`hotswap pipeline rollback {name} --to {version}`"
            )
    return (
        f"the swaps made versions up to {found.version_count} of pipeline {name!r}; "
        f"it is back on version {version}, where it was"
    )


class Swapper(threading.Thread):
    def __init__(self, plan: SwapPlan, t0: float, end: float, stop: Any) -> None:
        super().__init__(name="hotswap-loadtest-swapper", daemon=True)
        self.plan = plan
        self.t0 = t0
        self.end = end
        self.stop_flag = stop
        self.finished = threading.Event()  # set by the caller when the load is over
        self.records: list[SwapRecord] = []

    def run(self) -> None:
        try:
            with open_channel(self.plan.control, self.plan.security) as channel:
                stub: Any = control_pb2_grpc.ControlPlaneStub(channel)  # type: ignore[arg-type]
                self._loop(stub)
        finally:
            if self.plan.stop_load_after:
                self.stop_flag.value = 1

    def _loop(self, stub: Any) -> None:
        plan = self.plan
        next_at = self.t0 + plan.every
        while plan.count is None or len(self.records) < plan.count:
            # Don't start a swap whose window would run past the end of the load.
            if next_at + 0.3 > self.end:
                return
            if self.finished.wait(max(next_at - time.monotonic(), 0)):
                return
            record = self._swap(stub, len(self.records))
            self.records.append(record)
            if plan.on_swap is not None:
                plan.on_swap(record.index)
            next_at = max(next_at + plan.every, time.monotonic())
        if plan.stop_load_after:
            # Let the last swap's window fill with traffic before the load stops.
            self.finished.wait(0.3)

    def _swap(self, stub: Any, index: int) -> SwapRecord:
        plan = self.plan
        record = SwapRecord(index=index, model=plan.models[index % len(plan.models)])
        try:
            began = time.monotonic()
            version = stub.CreatePipelineVersion(
                control_pb2.CreatePipelineVersionRequest(
                    workspace=plan.workspace,
                    pipeline=plan.pipeline,
                    steps=[control_pb2.StepRef(model=record.model)],
                ),
                timeout=30,
            )
            sent = time.monotonic()
            answer = stub.Deploy(
                control_pb2.DeployRequest(
                    workspace=plan.workspace, pipeline=plan.pipeline, version=version.number
                ),
                timeout=60,
            )
            done = time.monotonic()
        except grpc.RpcError as exc:
            record.error = f"{exc.code().name}: {exc.details()}"
            record.start_s = record.end_s = time.monotonic() - self.t0
            return record
        record.version = int(answer.version.number)
        record.start_s, record.end_s = sent - self.t0, done - self.t0
        record.create_ms = (sent - began) * 1e3
        record.deploy_ms = (done - sent) * 1e3
        record.prepare_ms = answer.prepare_ms
        record.commit_ms = answer.commit_ms
        record.server_total_ms = answer.total_ms
        record.switch_us = max((e.switch_us for e in answer.engines), default=0.0)
        record.fetch_ms = max((e.fetch_ms for e in answer.engines), default=0.0)
        record.load_ms = max((e.load_ms for e in answer.engines), default=0.0)
        record.reused = all(e.reused for e in answer.engines) and bool(answer.engines)
        return record
