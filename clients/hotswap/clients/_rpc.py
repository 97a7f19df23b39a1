"""Typed, synchronous gRPC callables for the control plane and the engines.

The generated ``*_pb2_grpc`` stubs are typed for ``grpc.aio`` only, while the SDK is synchronous
(it must work in a plain script or a Jupyter cell without an event loop), so the few methods it
needs are bound here by their full names, with the error mapping in one place.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.message import Message

from hotswap.clients._errors import (
    InsecureTransportError,
    InsecureTransportWarning,
    from_rpc_error,
)
from hotswap.service.edge import env_flag, is_loopback
from hotswap.v1 import control_pb2, engine_pb2, types_pb2

_Req = TypeVar("_Req", bound=Message)
_Resp = TypeVar("_Resp", bound=Message)

# Arrow payloads can be large; batches are split well below this.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Keepalive pings while calls are open: a peer whose host died or whose link was cut (no
# RST ever comes) fails the call UNAVAILABLE within about KEEPALIVE_MS + KEEPALIVE_TIMEOUT_MS,
# so the SDK refreshes its endpoints and retries elsewhere instead of waiting out the
# deadline, and the dead connection is replaced (the services accept pings every second).
KEEPALIVE_MS = 2000
KEEPALIVE_TIMEOUT_MS = 2000
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass(frozen=True, slots=True)
class Security:
    """How the SDK authenticates: a bearer token and/or TLS (PEM bytes). Empty = plaintext."""

    token: str | None = None
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    # Send the token over plaintext to a non-loopback address (warns); refused otherwise.
    allow_plaintext_token: bool = False

    @classmethod
    def resolve(
        cls,
        environ: Mapping[str, str],
        token: str | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        allow_plaintext_token: bool | None = None,
    ) -> Security:
        """Arguments first, then ``HOTSWAP_TOKEN`` / ``HOTSWAP_TLS_CA`` / ``_CERT`` / ``_KEY``
        / ``HOTSWAP_ALLOW_PLAINTEXT_TOKEN`` (1 to allow)."""

        def pem(given: str | Path | None, variable: str) -> bytes | None:
            path = given or environ.get(variable)
            return Path(path).read_bytes() if path else None

        return cls(
            token=token or environ.get("HOTSWAP_TOKEN") or None,
            ca=pem(tls_ca, "HOTSWAP_TLS_CA"),
            cert=pem(tls_cert, "HOTSWAP_TLS_CERT"),
            key=pem(tls_key, "HOTSWAP_TLS_KEY"),
            allow_plaintext_token=(
                allow_plaintext_token
                if allow_plaintext_token is not None
                else env_flag(environ.get("HOTSWAP_ALLOW_PLAINTEXT_TOKEN"))
            ),
        )


def check_token_transport(address: str, security: Security) -> None:
    """Refuses to send a bearer token in cleartext off this machine, unless asked to.

    Raises:
        InsecureTransportError: a token, no TLS, a non-loopback address, and no opt-in.
    """
    if not security.token or security.ca is not None or is_loopback(address):
        return
    if not security.allow_plaintext_token:
        raise InsecureTransportError(
            f"refusing to send your token to {address} over plaintext: anyone on the network "
            "could read it. Turn on TLS (tls_ca= or HOTSWAP_TLS_CA), or accept the risk with "
            "allow_plaintext_token=True (HOTSWAP_ALLOW_PLAINTEXT_TOKEN=1)"
        )
    warnings.warn(
        f"sending a bearer token to {address} over plaintext (allow_plaintext_token is set)",
        InsecureTransportWarning,
        stacklevel=3,
    )


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call on a channel."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self._header]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)


def bearer(security: Security) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the bearer token, if any."""
    return (("authorization", f"Bearer {security.token}"),) if security.token else ()


def aio_channel(address: str, security: Security, own: bool = False) -> grpc.aio.Channel:
    """An asyncio channel with the SDK's limits, TLS when a CA is set (pass `bearer()` as
    call metadata for the token). With `own`, its connection is its own: channels to one
    address otherwise share one, and an engine of several processes serves each connection
    from one of them."""
    check_token_transport(address, security)
    options = [*_CHANNEL_OPTIONS, *([("grpc.use_local_subchannel_pool", 1)] if own else [])]
    if security.ca is None:
        return grpc.aio.insecure_channel(address, options=options)
    credentials = grpc.ssl_channel_credentials(security.ca, security.key, security.cert)
    return grpc.aio.secure_channel(address, credentials, options=options)


def open_channel(address: str, security: Security | None = None) -> grpc.Channel:
    """Opens a channel to ``address`` (host:port) with the SDK's message limits: TLS when a
    CA is configured, and the bearer token on every call when one is."""
    security = security or Security()
    check_token_transport(address, security)
    if security.ca is None:
        channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
    else:
        credentials = grpc.ssl_channel_credentials(security.ca, security.key, security.cert)
        channel = grpc.secure_channel(address, credentials, options=_CHANNEL_OPTIONS)
    if security.token:
        channel = grpc.intercept_channel(channel, _BearerToken(security.token))
    return channel


class Unary(Generic[_Req, _Resp]):
    """One unary method; raises :class:`HotswapError` subclasses instead of ``RpcError``."""

    def __init__(
        self,
        channel: grpc.Channel,
        method: str,
        response: type[_Resp],
        target: str,
        timeout: float | None,
    ) -> None:
        self._call: grpc.UnaryUnaryMultiCallable[_Req, _Resp] = channel.unary_unary(
            method,
            request_serializer=_serialize,
            response_deserializer=response.FromString,
        )
        self._target = target
        self._timeout = timeout

    def __call__(
        self, request: _Req, *, timeout: float | None = None, request_id: str | None = None
    ) -> _Resp:
        """Calls the method; ``request_id`` (default: a new one) goes out as ``x-request-id``
        so the services' logs of this call can be found."""
        try:
            return self._call(
                request,
                timeout=self._timeout if timeout is None else timeout,
                metadata=((REQUEST_ID_HEADER, request_id or new_request_id()),),
            )
        except grpc.RpcError as err:
            limit = self._timeout if timeout is None else timeout
            raise from_rpc_error(err, target=self._target, timeout=limit) from None


class StreamUnary(Generic[_Req, _Resp]):
    """One client-streaming method, with the same error mapping as :class:`Unary`."""

    def __init__(
        self, channel: grpc.Channel, method: str, response: type[_Resp], target: str
    ) -> None:
        self._call: grpc.StreamUnaryMultiCallable[_Req, _Resp] = channel.stream_unary(
            method,
            request_serializer=_serialize,
            response_deserializer=response.FromString,
        )
        self._target = target

    def __call__(self, requests: Iterator[_Req], *, timeout: float | None = None) -> _Resp:
        try:
            return self._call(
                requests, timeout=timeout, metadata=((REQUEST_ID_HEADER, new_request_id()),)
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err, target=self._target) from None


REQUEST_ID_HEADER = "x-request-id"


def new_request_id() -> str:
    """A fresh request id (32 hex digits)."""
    return uuid.uuid4().hex


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


_CONTROL = "/hotswap.v1.ControlPlane/"
# Metadata calls are quick; Deploy and uploads may legitimately take minutes.
_CONTROL_TIMEOUT = 30.0


class ControlStub:
    """The control plane methods the SDK uses."""

    def __init__(self, channel: grpc.Channel, address: str) -> None:
        target = f"the control plane at {address} (is it running? `hotswap up` starts one)"

        def unary(
            name: str, resp: type[_Resp], timeout: float | None = _CONTROL_TIMEOUT
        ) -> Unary[_Req, _Resp]:
            return Unary(channel, _CONTROL + name, resp, target, timeout)

        cp = control_pb2
        self.create_workspace: Unary[cp.CreateWorkspaceRequest, cp.Workspace] = unary(
            "CreateWorkspace", cp.Workspace
        )
        self.list_workspaces: Unary[cp.ListWorkspacesRequest, cp.ListWorkspacesResponse] = unary(
            "ListWorkspaces", cp.ListWorkspacesResponse
        )
        self.upload_model: StreamUnary[cp.UploadModelRequest, types_pb2.ModelVersion] = StreamUnary(
            channel, _CONTROL + "UploadModel", types_pb2.ModelVersion, target
        )
        self.list_models: Unary[cp.ListModelsRequest, cp.ListModelsResponse] = unary(
            "ListModels", cp.ListModelsResponse
        )
        self.get_model: Unary[cp.GetModelRequest, cp.Model] = unary("GetModel", cp.Model)
        self.create_pipeline: Unary[cp.CreatePipelineRequest, cp.Pipeline] = unary(
            "CreatePipeline", cp.Pipeline
        )
        self.list_pipelines: Unary[cp.ListPipelinesRequest, cp.ListPipelinesResponse] = unary(
            "ListPipelines", cp.ListPipelinesResponse
        )
        self.get_pipeline: Unary[cp.GetPipelineRequest, cp.Pipeline] = unary(
            "GetPipeline", cp.Pipeline
        )
        self.create_pipeline_version: Unary[
            cp.CreatePipelineVersionRequest, types_pb2.PipelineVersion
        ] = unary("CreatePipelineVersion", types_pb2.PipelineVersion)
        self.list_pipeline_versions: Unary[
            cp.ListPipelineVersionsRequest, cp.ListPipelineVersionsResponse
        ] = unary("ListPipelineVersions", cp.ListPipelineVersionsResponse)
        self.deploy: Unary[cp.DeployRequest, cp.DeployResponse] = unary(
            "Deploy", cp.DeployResponse, None
        )
        self.undeploy: Unary[cp.UndeployRequest, cp.UndeployResponse] = unary(
            "Undeploy", cp.UndeployResponse, None
        )
        self.get_pipeline_status: Unary[cp.GetPipelineStatusRequest, cp.PipelineStatus] = unary(
            "GetPipelineStatus", cp.PipelineStatus
        )
        self.get_pipeline_endpoints: Unary[cp.GetPipelineEndpointsRequest, cp.PipelineEndpoints] = (
            unary("GetPipelineEndpoints", cp.PipelineEndpoints)
        )
        self.list_engines: Unary[cp.ListEnginesRequest, cp.ListEnginesResponse] = unary(
            "ListEngines", cp.ListEnginesResponse
        )
        self.get_pipeline_logs: Unary[types_pb2.GetLogsRequest, types_pb2.LogsResponse] = unary(
            "GetPipelineLogs", types_pb2.LogsResponse
        )
        self.list_swaps: Unary[cp.ListSwapsRequest, cp.ListSwapsResponse] = unary(
            "ListSwaps", cp.ListSwapsResponse
        )
        # A rollout's first step is a deploy: no client-side deadline, as for Deploy.
        self.start_rollout: Unary[cp.StartRolloutRequest, cp.Rollout] = unary(
            "StartRollout", cp.Rollout, None
        )
        self.get_rollout: Unary[cp.GetRolloutRequest, cp.Rollout] = unary("GetRollout", cp.Rollout)
        self.abort_rollout: Unary[cp.AbortRolloutRequest, cp.Rollout] = unary(
            "AbortRollout", cp.Rollout, None
        )


def engine_infer(
    channel: grpc.Channel, address: str
) -> Unary[engine_pb2.InferRequest, engine_pb2.InferResponse]:
    """``Engine.Infer`` on one engine; the caller passes the timeout on every call."""
    return Unary(
        channel, "/hotswap.v1.Engine/Infer", engine_pb2.InferResponse, f"engine {address}", None
    )
