"""The console's data API: ``POST /api/<Method>`` with a JSON body, a thin gateway to the real
ControlPlane gRPC API over the control plane's private socket.

It holds no auth or domain logic: the browser's ``Authorization`` header travels as call
metadata, so the token, workspace rights, limits and validation are the gRPC API's own, and
the answer is the RPC's message as JSON (proto3 JSON mapping, proto field names). What it
adds is only what HTTP needs: an allowlist of unary methods (the page's reads, and Deploy for
rollbacks), a bound on the body, and one table from gRPC status to HTTP status.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import orjson
from google.protobuf import json_format, message_factory
from google.protobuf.message import Message
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from hotswap.service.http_edge import BodyRefused, read_body
from hotswap.service.log_config import REQUEST_ID_HEADER, new_request_id
from hotswap.v1 import control_pb2

log = logging.getLogger(__name__)

SERVICE = control_pb2.DESCRIPTOR.services_by_name["ControlPlane"]
# What the page calls. Everything else (uploads, creating things, Fleet) stays gRPC-only.
METHODS = (
    "ListWorkspaces",
    "ListPipelines",
    "ListPipelineVersions",
    "GetPipelineStatus",
    "ListEngines",
    "ListSwaps",
    "Deploy",
)
# The largest JSON body taken: the page's requests are a few hundred bytes.
MAX_BODY_BYTES = 1024 * 1024
# Reads answer in milliseconds; a Deploy is bounded by the control plane's own prepare and
# commit timeouts, and a deadline here would abort a swap the browser merely stopped awaiting.
READ_TIMEOUT = 15.0
# The browser's address, for the swap timeline of an open control plane (servicers.py reads
# it only from calls that came over the private socket).
CLIENT_HEADER = "x-hotswap-console-client"

HTTP_STATUS: Mapping[grpc.StatusCode, int] = {
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


@dataclass(frozen=True, slots=True)
class _Method:
    call: grpc.aio.UnaryUnaryMultiCallable[Any, Any]
    request: type[Message]
    timeout: float | None


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status)


class Gateway:
    """The ASGI endpoint of ``/api/{method}``, calling the API over `channel`."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._methods: dict[str, _Method] = {}
        for name in METHODS:
            method = SERVICE.methods_by_name[name]
            assert not method.client_streaming and not method.server_streaming, name
            request = message_factory.GetMessageClass(method.input_type)
            response = message_factory.GetMessageClass(method.output_type)
            call = channel.unary_unary(
                f"/{SERVICE.full_name}/{name}",
                request_serializer=request.SerializeToString,
                response_deserializer=response.FromString,
            )
            self._methods[name] = _Method(call, request, None if name == "Deploy" else READ_TIMEOUT)

    async def __call__(self, request: Request) -> Response:
        method = self._methods.get(request.path_params["method"])
        if method is None:
            return error(404, "the console API has no such method")
        try:
            message = json_format.ParseDict(await _json_body(request), method.request())
            metadata = _metadata(request)
        except _Refused as exc:
            return error(exc.status, str(exc))
        except json_format.ParseError as exc:
            return error(400, f"the request does not fit the method: {exc}")
        try:
            answer = await method.call(message, metadata=metadata, timeout=method.timeout)
        except grpc.aio.AioRpcError as exc:
            return error(HTTP_STATUS.get(exc.code(), 500), exc.details() or exc.code().name)
        body = json_format.MessageToDict(
            answer,
            always_print_fields_with_no_presence=True,
            preserving_proto_field_name=True,
            unquote_int64_if_possible=True,
        )
        return JSONResponse(body, headers={REQUEST_ID_HEADER: dict(metadata)[REQUEST_ID_HEADER]})


async def _json_body(request: Request) -> dict[str, Any]:
    """The JSON object of the body, read up to `MAX_BODY_BYTES`.

    Only ``application/json`` is taken: a page on another site can send a form or text
    without asking, but not JSON, which makes the browser ask first (CORS), and it is never
    told yes.
    """
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise _Refused(415, "send the request as Content-Type: application/json")
    try:
        body = await read_body(request, MAX_BODY_BYTES)
    except BodyRefused as exc:
        raise _Refused(exc.status, str(exc)) from None
    try:
        doc = orjson.loads(body or b"{}")  # its nesting is bounded, unlike json's recursion
    except orjson.JSONDecodeError:
        raise _Refused(400, "the request body is not JSON") from None
    if not isinstance(doc, dict):
        raise _Refused(400, "the request body must be a JSON object")
    return doc


def _metadata(request: Request) -> tuple[tuple[str, str], ...]:
    given = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = given if _printable(given, 100) and given else new_request_id()
    metadata = [(REQUEST_ID_HEADER, request_id)]
    authorization = request.headers.get("authorization")
    if authorization is not None:
        if not _printable(authorization, 4096):
            raise _Refused(400, "the Authorization header is not a bearer token")
        metadata.append(("authorization", authorization))
    if request.client is not None:
        host, port = request.client.host, request.client.port
        metadata.append((CLIENT_HEADER, f"[{host}]:{port}" if ":" in host else f"{host}:{port}"))
    return tuple(metadata)


def _printable(value: str, limit: int) -> bool:
    return len(value) <= limit and value.isascii() and value.isprintable()
