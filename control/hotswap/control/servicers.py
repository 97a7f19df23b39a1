"""gRPC servicers of the control plane: decode, call the domain, encode. Nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from hotswap.control import _convert, auth
from hotswap.control.blobs import BlobStore, check_sha256
from hotswap.control.console.gateway import CLIENT_HEADER
from hotswap.control.coordinator import SwapCoordinator
from hotswap.control.engine_logs import LogGatherer
from hotswap.control.errors import (
    AlreadyExists,
    BlobCorrupt,
    DeployConflict,
    DeployFailed,
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
    NoEngines,
    NotFound,
)
from hotswap.control.fleet import EngineConnection, EngineRefused, Fleet
from hotswap.control.rollout import Rollouts
from hotswap.control.status import StatusBoard
from hotswap.control.store import Store
from hotswap.control.timeline import SwapTimeline
from hotswap.control.uploads import ModelUploads, UploadHeader
from hotswap.service import log_config as _logs
from hotswap.service.edge import StatusTable, stream_errors, unary_errors
from hotswap.v1 import control_pb2, control_pb2_grpc, fleet_pb2, fleet_pb2_grpc, types_pb2

log = logging.getLogger(__name__)

STATUS: StatusTable = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeployFailed: grpc.StatusCode.FAILED_PRECONDITION,
    DeployConflict: grpc.StatusCode.ABORTED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    NoEngines: grpc.StatusCode.UNAVAILABLE,
    BlobCorrupt: grpc.StatusCode.DATA_LOSS,
    auth.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    auth.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}
unary = unary_errors(STATUS)
streaming = stream_errors(STATUS)

Context = grpc.aio.ServicerContext[Any, Any]
BLOB_CHUNK = 1024 * 1024
_ADDRESS = re.compile(r"[0-9A-Fa-f.:\[\]]{1,60}")
DEFAULT_PAGE = 100
MAX_PAGE = 1000


def _engine_info(connection: EngineConnection, lost: bool) -> control_pb2.EngineInfo:
    """One engine as ListEngines shows it: only the caller's workspaces' pipelines."""
    return control_pb2.EngineInfo(
        name=connection.name,
        address=connection.address,
        state="Lost" if lost else "Connected",
        state_code=(
            control_pb2.CONNECTION_STATE_LOST if lost else control_pb2.CONNECTION_STATE_CONNECTED
        ),
        last_seen_ms=connection.last_seen_ms,
        draining=connection.draining,
        labels=connection.labels,
        http_address=connection.http_address,
        serving=[
            f"{p.workspace}/{p.pipeline}@{p.number}"
            for p in connection.serving.values()
            if auth.may_see(p.workspace)
        ],
    )


def _requested_by(note: str, context: Context) -> str:
    """Who asked, for the swap timeline: the authenticated token's name, never a claim."""
    principal = auth.current.get()
    who = f"unauthenticated {_peer(context)}" if principal is auth.OPEN else principal.name
    note = note.strip()[:100]
    return f"{who} ({note})" if note and note != who else who


def _peer(context: Context) -> str:
    """The caller's address; for a call over the private socket, which only the web console
    uses (docs/console.md), the browser's address the console saw."""
    peer = context.peer()
    if not peer.startswith("unix:"):
        return peer
    client = dict(context.invocation_metadata() or ()).get(CLIENT_HEADER, "")
    if isinstance(client, str) and _ADDRESS.fullmatch(client):
        return f"console {client}"
    return "console"


class ControlPlaneServicer(control_pb2_grpc.ControlPlaneServicer):
    def __init__(
        self,
        store: Store,
        uploads: ModelUploads,
        coordinator: SwapCoordinator,
        fleet: Fleet,
        *,
        timeline: SwapTimeline,
        logs: LogGatherer,
        rollouts: Rollouts,
    ) -> None:
        self._status = StatusBoard(store, fleet, coordinator.running)
        self._rollouts = rollouts
        self._store = store
        self._uploads = uploads
        self._coordinator = coordinator
        self._fleet = fleet
        self._timeline = timeline
        self._logs = logs

    @unary
    async def CreateWorkspace(
        self, request: control_pb2.CreateWorkspaceRequest, context: Context
    ) -> control_pb2.Workspace:
        auth.require_workspace(request.name)
        return _convert.workspace(self._store.create_workspace(request.name))

    @unary
    async def ListWorkspaces(
        self, request: control_pb2.ListWorkspacesRequest, context: Context
    ) -> control_pb2.ListWorkspacesResponse:
        return control_pb2.ListWorkspacesResponse(
            workspaces=[
                _convert.workspace(w) for w in self._store.list_workspaces() if auth.may_see(w.name)
            ]
        )

    @unary
    async def UploadModel(
        self, request_iterator: AsyncIterator[control_pb2.UploadModelRequest], context: Context
    ) -> Any:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("an upload must start with a message carrying `header`")
        h = first.header
        header = UploadHeader(h.workspace, h.name, h.sha256, h.size_bytes)
        auth.require_workspace(h.workspace)

        async def chunks() -> AsyncIterator[bytes]:
            async for message in request_iterator:
                if message.WhichOneof("part") != "chunk":
                    raise InvalidArgument("only `chunk` messages may follow the header")
                yield message.chunk

        return _convert.model_version(await self._uploads.upload(header, chunks()))

    @unary
    async def ListModels(
        self, request: control_pb2.ListModelsRequest, context: Context
    ) -> control_pb2.ListModelsResponse:
        return control_pb2.ListModelsResponse(
            models=[
                control_pb2.ModelSummary(
                    name=m.name, latest=_convert.model_version(m), version_count=count
                )
                for m, count in self._store.list_models(request.workspace)
            ]
        )

    @unary
    async def GetModel(
        self, request: control_pb2.GetModelRequest, context: Context
    ) -> control_pb2.Model:
        versions = self._store.model_versions(request.workspace, request.name)
        return control_pb2.Model(
            workspace=request.workspace,
            name=request.name,
            versions=[_convert.model_version(v) for v in versions],
        )

    @unary
    async def CreatePipeline(
        self, request: control_pb2.CreatePipelineRequest, context: Context
    ) -> control_pb2.Pipeline:
        return _convert.pipeline(self._store.create_pipeline(request.workspace, request.name))

    @unary
    async def ListPipelines(
        self, request: control_pb2.ListPipelinesRequest, context: Context
    ) -> control_pb2.ListPipelinesResponse:
        return control_pb2.ListPipelinesResponse(
            pipelines=[_convert.pipeline(p) for p in self._store.list_pipelines(request.workspace)]
        )

    @unary
    async def GetPipeline(
        self, request: control_pb2.GetPipelineRequest, context: Context
    ) -> control_pb2.Pipeline:
        return _convert.pipeline(self._store.get_pipeline(request.workspace, request.name))

    @unary
    async def CreatePipelineVersion(
        self, request: control_pb2.CreatePipelineVersionRequest, context: Context
    ) -> Any:
        version = self._store.create_pipeline_version(
            request.workspace,
            request.pipeline,
            [(s.model, s.version) for s in request.steps],
            [_convert.split_request(s) for s in request.splits],
        )
        return _convert.pipeline_version(version)

    @unary
    async def ListPipelineVersions(
        self, request: control_pb2.ListPipelineVersionsRequest, context: Context
    ) -> control_pb2.ListPipelineVersionsResponse:
        size = request.page_size or DEFAULT_PAGE
        if not 0 < size <= MAX_PAGE:
            raise InvalidArgument(f"page_size must be 1 to {MAX_PAGE} (0 means {DEFAULT_PAGE})")
        after = 0
        if request.page_token:
            if not request.page_token.isdigit():
                raise InvalidArgument("page_token must be a next_page_token from an earlier page")
            after = int(request.page_token)
        versions = self._store.pipeline_versions(
            request.workspace, request.pipeline, after=after, limit=size + 1
        )
        more = len(versions) > size
        versions = versions[:size]
        return control_pb2.ListPipelineVersionsResponse(
            versions=[_convert.pipeline_version(v) for v in versions],
            next_page_token=str(versions[-1].number) if more else "",
        )

    @unary
    async def Deploy(
        self, request: control_pb2.DeployRequest, context: Context
    ) -> control_pb2.DeployResponse:
        if request.replicas < 0:
            raise InvalidArgument("replicas must be 0 (keep / default 1) or more")
        expected = (
            request.expected_current_version
            if request.HasField("expected_current_version")
            else None
        )
        result = await self._coordinator.deploy(
            request.workspace,
            request.pipeline,
            request.version,
            request.replicas,
            expected,
            requested_by=_requested_by(request.requested_by, context),
            request_id=_logs.request_id.get(),
        )
        response = control_pb2.DeployResponse(
            version=_convert.pipeline_version(result.version),
            engines=[_convert.engine_stage(stage) for stage in result.engines],
            prepare_ms=result.prepare_ms,
            commit_ms=result.commit_ms,
            total_ms=result.total_ms,
            unconfirmed_engines=result.unconfirmed,
        )
        if result.previous is not None:
            response.previous.CopyFrom(_convert.pipeline_version(result.previous))
        return response

    @unary
    async def Undeploy(
        self, request: control_pb2.UndeployRequest, context: Context
    ) -> control_pb2.UndeployResponse:
        unconfirmed = await self._coordinator.undeploy(
            request.workspace,
            request.pipeline,
            requested_by=_requested_by("", context),
            request_id=_logs.request_id.get(),
        )
        return control_pb2.UndeployResponse(unconfirmed_engines=unconfirmed)

    @unary
    async def GetPipelineStatus(
        self, request: control_pb2.GetPipelineStatusRequest, context: Context
    ) -> control_pb2.PipelineStatus:
        status = self._status.status(request.workspace, request.pipeline)
        message = control_pb2.PipelineStatus(
            workspace=status.workspace,
            pipeline=status.pipeline,
            status=status.status,
            status_code=_convert.serving_status(status.status),
            details=status.details,
            replicas=status.deployment.replicas if status.deployment else 0,
            engines=[
                control_pb2.EngineStatus(
                    name=e.name,
                    address=e.address,
                    status=e.status,
                    status_code=_convert.serving_status(e.status),
                    reason=e.reason,
                    serving_version=e.serving_version,
                    last_seen_ms=e.last_seen_ms,
                    http_address=e.http_address,
                    models=[
                        control_pb2.ModelStatus(
                            name=m.name,
                            version=m.version,
                            sha256=m.sha256,
                            status=m.status,
                            status_code=_convert.serving_status(m.status),
                        )
                        for m in e.models
                    ],
                )
                for e in status.engines
            ],
        )
        message.rates.extend(_convert.version_rate(rate) for rate in status.rates)
        if status.deployment is not None:
            message.deployed.CopyFrom(_convert.pipeline_version(status.deployment.version))
        if status.swap is not None:
            message.swap_in_progress.CopyFrom(_convert.swap_in_progress(status.swap))
        rollout = self._rollouts.running(request.workspace, request.pipeline)
        if rollout is not None:
            message.rollout.CopyFrom(_convert.rollout(rollout))
        return message

    @unary
    async def StartRollout(
        self, request: control_pb2.StartRolloutRequest, context: Context
    ) -> control_pb2.Rollout:
        if not request.model.model:
            raise InvalidArgument("name the model to roll out (StartRolloutRequest.model)")
        rollout = await self._rollouts.start(
            request.workspace,
            request.pipeline,
            request.model.model,
            request.model.version,
            step=request.step,
            percents=list(request.percents),
            step_seconds=request.step_seconds,
            max_error_rate=(request.max_error_rate if request.HasField("max_error_rate") else None),
            max_latency_ratio=request.max_latency_ratio,
            min_requests=request.min_requests,
            requested_by=_requested_by(request.requested_by, context),
        )
        return _convert.rollout(rollout)

    @unary
    async def GetRollout(
        self, request: control_pb2.GetRolloutRequest, context: Context
    ) -> control_pb2.Rollout:
        rollout = self._rollouts.latest(request.workspace, request.pipeline, request.id)
        return _convert.rollout(rollout)

    @unary
    async def AbortRollout(
        self, request: control_pb2.AbortRolloutRequest, context: Context
    ) -> control_pb2.Rollout:
        rollout = await self._rollouts.abort(request.workspace, request.pipeline, request.reason)
        return _convert.rollout(rollout)

    @unary
    async def GetPipelineEndpoints(
        self, request: control_pb2.GetPipelineEndpointsRequest, context: Context
    ) -> control_pb2.PipelineEndpoints:
        number, addresses = self._status.endpoints(request.workspace, request.pipeline)
        return control_pb2.PipelineEndpoints(version=number, addresses=addresses)

    @unary
    async def ListEngines(
        self, request: control_pb2.ListEnginesRequest, context: Context
    ) -> control_pb2.ListEnginesResponse:
        fleet = self._fleet
        connections = sorted(fleet.connections.values(), key=lambda s: s.name)
        return control_pb2.ListEnginesResponse(
            engines=[_engine_info(s, s.lost(fleet.lost_after)) for s in connections]
        )

    @unary
    async def GetPipelineLogs(
        self, request: types_pb2.GetLogsRequest, context: Context
    ) -> types_pb2.LogsResponse:
        self._store.get_pipeline(request.workspace, request.pipeline)  # NOT_FOUND when unknown
        return await self._logs.gather(request)

    @unary
    async def ListSwaps(
        self, request: control_pb2.ListSwapsRequest, context: Context
    ) -> control_pb2.ListSwapsResponse:
        self._store.get_pipeline(request.workspace, request.pipeline)  # NOT_FOUND when unknown
        swaps = self._timeline.list(request.workspace, request.pipeline, request.limit)
        return control_pb2.ListSwapsResponse(swaps=[_convert.swap_record(s) for s in swaps])


class FleetServicer(fleet_pb2_grpc.FleetServicer):
    def __init__(
        self, fleet: Fleet, coordinator: SwapCoordinator, blobs: BlobStore, store: Store
    ) -> None:
        self._fleet = fleet
        self._coordinator = coordinator
        self._blobs = blobs
        self._store = store

    async def Connect(
        self, request_iterator: AsyncIterator[fleet_pb2.EngineMessage], context: Context
    ) -> AsyncIterator[fleet_pb2.ControlMessage]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("kind") != "hello":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "an engine must open with `hello`"
            )
            return
        hello = first.hello
        principal = auth.current.get()
        if principal is not auth.OPEN and not principal.may_be_engine(hello.name):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"engine credential {principal.name!r} may not connect as engine "
                f"{hello.name!r}: add the name to its `names` in the token file",
            )
            return
        try:
            connection = self._fleet.connect(
                hello, "" if principal is auth.OPEN else principal.name
            )
        except EngineRefused as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            return
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        if connection.draining:  # a drain its previous stream began
            self._coordinator.engine_draining(connection.name)
        self._coordinator.engine_connected(connection.name)

        async def read() -> None:
            try:
                async for message in request_iterator:
                    was_draining = connection.draining
                    self._fleet.handle(connection, message)
                    if connection.draining and not was_draining:
                        self._coordinator.engine_draining(connection.name)
            finally:
                self._fleet.disconnect(connection)

        reader = asyncio.create_task(read())
        try:
            while (message := await connection.outbox.get()) is not None:
                yield message
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self._fleet.disconnect(connection)

    def _check_fetch(self, request: fleet_pb2.FetchBlobRequest) -> None:
        """A secured control plane serves an engine only what its live stream is meant to
        have; an open one, any blob of a stored model version."""
        check_sha256(request.sha256)
        principal = auth.current.get()
        missing = NotFound(f"blob {request.sha256} is not one this engine is meant to serve")
        if principal is auth.OPEN:
            if not self._store.has_blob(request.sha256):
                raise missing
            return
        connection = self._fleet.connections.get(request.engine)
        if (
            connection is None
            or not connection.connected
            or connection.principal != principal.name
            or connection.instance_id != request.instance_id
        ):
            raise auth.PermissionDenied(
                f"no live engine {request.engine!r} of this credential: fetch blobs over the "
                "engine's own Connect stream (send its name and instance_id)"
            )
        if not connection.may_fetch(request.sha256):
            raise missing

    @streaming
    async def FetchBlob(
        self, request: fleet_pb2.FetchBlobRequest, context: Context
    ) -> AsyncIterator[fleet_pb2.BlobChunk]:
        self._check_fetch(request)
        path = self._blobs.path(request.sha256)
        total = path.stat().st_size
        if not 0 <= request.offset <= total:
            raise InvalidArgument(f"offset {request.offset} is outside the blob (0..{total})")
        # Every read is verified as it streams, a resumed one too (its prefix is hashed
        # first): corruption on this disk is reported here, with what to do, rather than
        # only as a mismatch on the engine.
        digest = await asyncio.to_thread(_hash_prefix, path, request.offset)
        with path.open("rb") as f:
            f.seek(request.offset)
            offset = request.offset
            while data := f.read(BLOB_CHUNK):
                digest.update(data)
                if offset + len(data) == total and digest.hexdigest() != request.sha256:
                    raise BlobCorrupt(
                        f"blob {request.sha256} is corrupt on the control plane's disk: "
                        "upload the model again"
                    )
                yield fleet_pb2.BlobChunk(offset=offset, data=data, total_size=total)
                offset += len(data)


def _hash_prefix(path: Path, length: int) -> Any:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while length > 0 and (data := f.read(min(BLOB_CHUNK, length))):
            digest.update(data)
            length -= len(data)
    return digest
