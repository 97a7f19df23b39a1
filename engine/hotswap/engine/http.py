"""HTTP on the engine (`--http-listen`): the Open Inference Protocol's REST binding and
Wallaroo's formats, on the same data plane as gRPC.

Routes only translate: every inference goes through `DataPlane.serve` (one version per
request, the queue bound, metrics, the inference log), with the same token check (the
control plane's rules, `Authorization: Bearer`), the same row limit and a body bound equal to
gRPC's message limit. Answers say what served them in ``x-hotswap-*`` headers.

- ``GET /v2/health/live``, ``/v2/health/ready``: open, as gRPC health is (probes carry no
  token); they tell nothing about pipelines.
- ``GET /v2``, ``/v2/models/<pipeline>[/versions/<n>]``, ``.../ready``; ``POST .../infer``
  (JSON, or the binary data extension).
- ``POST /v1/api/pipelines/infer/<workspace>/<pipeline>``: ``pipeline.url()``, pandas-records
  JSON or an Arrow file in, the same format out.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hotswap.engine import access, oip, oip_rest, wallaroo_formats
from hotswap.engine.dataplane import DataPlane, Ran
from hotswap.engine.errors import (
    InvalidInput,
    ModelUnavailable,
    Overloaded,
    PipelineLoading,
    PipelineNotServed,
    RequestTooLarge,
)
from hotswap.engine.health import readiness
from hotswap.engine.host import EngineHost
from hotswap.engine.runtime import LoadedPipeline
from hotswap.oip import grpc_service_pb2 as pb
from hotswap.service.http_edge import MAX_BODY_BYTES, BodyRefused, host_is_address, read_body

log = logging.getLogger(__name__)

# Most specific first, as gRPC's table (servicers.STATUS) is matched.
HTTP_STATUS: dict[type[Exception], int] = {
    wallaroo_formats.UnsupportedFormat: 415,
    InvalidInput: 400,
    PipelineNotServed: 404,
    PipelineLoading: 503,
    ModelUnavailable: 503,
    RequestTooLarge: 413,
    Overloaded: 429,
    access.Unauthenticated: 401,
    access.PermissionDenied: 403,
}
INFERENCE_HEADER = "inference-header-content-length"
Handler = Callable[[Request], Awaitable[Response]]


def http_status(exc: Exception) -> int | None:
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return None


def _answers_errors(handler: Handler) -> Handler:
    """A domain error becomes its status with ``{"error": message}`` (the protocol's error
    body); anything else is logged and answered 500 without internals."""

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except BodyRefused as exc:
            return JSONResponse({"error": str(exc)}, exc.status)
        except Exception as exc:
            status = http_status(exc)
            if status is None:  # a bug, not the caller's doing: the log has it, not the answer
                log.exception("HTTP %s %s failed", request.method, request.url.path)
                return JSONResponse({"error": "internal error: see the engine's log"}, 500)
            headers = {"www-authenticate": "Bearer"} if status == 401 else None
            return JSONResponse({"error": str(exc)}, status, headers=headers)

    return wrapped


def served_headers(loaded: LoadedPipeline) -> dict[str, str]:
    """What served a request, as response headers: the version's identity, which the native
    answer carries as Arrow schema metadata (hotswap.pipeline_version ->
    x-hotswap-pipeline-version)."""
    return {f"x-{k.replace('.', '-').replace('_', '-')}": v for k, v in loaded.identity.items()}


class EngineHttp:
    def __init__(
        self,
        host: EngineHost,
        plane: DataPlane,
        rules: access.Rules,
        partition: str,
        *,
        loopback_only: bool = False,
    ) -> None:
        self._host = host
        self._plane = plane
        self._rules = rules
        self._partition = partition  # the engine's name, in Wallaroo's metadata
        # Bound to loopback: only Host values that are addresses, so that a web page whose
        # name is rebound to 127.0.0.1 (DNS rebinding) cannot call an engine on a laptop.
        self._loopback_only = loopback_only

    def app(self) -> Starlette:
        guarded = [
            ("/v2", self.server_metadata, "GET"),
            ("/v2/models/{name}", self.model_metadata, "GET"),
            ("/v2/models/{name}/versions/{version}", self.model_metadata, "GET"),
            ("/v2/models/{name}/ready", self.model_ready, "GET"),
            ("/v2/models/{name}/versions/{version}/ready", self.model_ready, "GET"),
            ("/v2/models/{name}/infer", self.oip_infer, "POST"),
            ("/v2/models/{name}/versions/{version}/infer", self.oip_infer, "POST"),
            ("/v1/api/pipelines/infer/{workspace}/{pipeline}", self.wallaroo_infer, "POST"),
        ]
        routes = [
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.ready, methods=["GET"]),
            *(Route(path, _answers_errors(h), methods=[m]) for path, h, m in guarded),
        ]
        return Starlette(routes=routes)

    def _caller(self, request: Request) -> access.Caller:
        if self._loopback_only and not host_is_address(request.headers.get("host", "")):
            raise access.PermissionDenied(
                f"this engine serves HTTP on loopback only; call it as 127.0.0.1 or localhost, "
                f"not {request.headers.get('host', '')[:100]!r}"
            )
        return self._rules.authenticate(request.headers.get("authorization"))

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        ready = readiness(self._host)[0]
        return JSONResponse({"ready": ready}, 200 if ready else 503)

    async def server_metadata(self, request: Request) -> Response:
        self._caller(request)
        message = oip.server_metadata()
        return JSONResponse(
            {"name": message.name, "version": message.version, "extensions": [*message.extensions]}
        )

    def _lookup(self, request: Request, caller: access.Caller) -> LoadedPipeline:
        params = request.path_params
        workspace = request.query_params.get("workspace", "")
        return oip.lookup(self._host, caller, params["name"], params.get("version", ""), workspace)

    async def model_metadata(self, request: Request) -> Response:
        loaded = self._lookup(request, self._caller(request))
        return JSONResponse(oip_rest.metadata_document(oip.model_metadata(loaded)))

    async def model_ready(self, request: Request) -> Response:
        caller = self._caller(request)
        name = request.path_params["name"]
        try:
            self._lookup(request, caller)
        except (PipelineNotServed, PipelineLoading):
            return JSONResponse({"name": name, "ready": False}, 503)
        return JSONResponse({"name": name, "ready": True})

    async def oip_infer(self, request: Request) -> Response:
        caller = self._caller(request)
        body = await read_body(request, MAX_BODY_BYTES)
        header_length = request.headers.get(INFERENCE_HEADER)
        max_rows = self._plane.max_rows
        parsed: list[oip_rest.RestRequest] = []

        def run(loaded: LoadedPipeline) -> Ran[pb.ModelInferResponse]:
            # Parsed here, on an inference thread for big bodies, as gRPC's decode runs.
            rest = oip_rest.parse_infer(body, header_length)
            named = oip.workspace_parameter(rest.message)
            if named and named != loaded.spec.workspace:
                raise InvalidInput(
                    f"parameter workspace {named!r} is not the served pipeline's: name it in "
                    "the URL (?workspace=...)"
                )
            parsed.append(rest)
            return oip.infer(loaded, rest.message, max_rows)

        served = await self._plane.serve(
            lambda: self._lookup(request, caller), run, nbytes=len(body)
        )
        content, json_length = oip_rest.render_infer(served.answer, parsed[0].binary_outputs)
        headers = served_headers(served.loaded)
        if json_length is None:
            return Response(content, media_type="application/json", headers=headers)
        headers = {**headers, INFERENCE_HEADER: str(json_length)}
        return Response(content, media_type="application/octet-stream", headers=headers)

    async def wallaroo_infer(self, request: Request) -> Response:
        caller = self._caller(request)
        kind = wallaroo_formats.format_of(request.headers.get("content-type", ""))
        workspace, pipeline = request.path_params["workspace"], request.path_params["pipeline"]
        caller.check(workspace)  # before the body is read: an outsider's body is never held
        body = await read_body(request, MAX_BODY_BYTES)
        max_rows, partition = self._plane.max_rows, self._partition
        served = await self._plane.serve(
            lambda: self._host.lookup(workspace, pipeline, caller.may_use),
            lambda loaded: wallaroo_formats.run(loaded, body, kind, max_rows, partition),
            nbytes=len(body),
        )
        media = "application/json" if kind == wallaroo_formats.RECORDS else kind
        return Response(served.answer, media_type=media, headers=served_headers(served.loaded))
