"""The console's HTTP app: the page (three files of its own, nothing fetched from elsewhere),
the data gateway, and the headers every answer carries."""

from __future__ import annotations

from pathlib import Path

import grpc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hotswap.control.console.gateway import Gateway, error
from hotswap.service.http_edge import host_is_address

STATIC = Path(__file__).parent / "static"
# The page's files, by the path they are served at.
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/console.js": ("console.js", "text/javascript; charset=utf-8"),
    "/console.css": ("console.css", "text/css; charset=utf-8"),
}
HEADERS = (
    # Only the console's own files run, and no other site may frame it (clickjacking).
    (b"content-security-policy", b"default-src 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)


def console_app(channel: grpc.aio.Channel, *, check_host: bool = False) -> ASGIApp:
    """The console, calling the ControlPlane API over `channel`. With `check_host` (an open
    control plane), only requests naming this machine by address or as localhost are
    answered: a site that rebinds its own name to this address gets nothing."""
    files = {path: ((STATIC / name).read_bytes(), kind) for path, (name, kind) in ASSETS.items()}

    async def asset(request: Request) -> Response:
        body, kind = files[request.url.path]
        return Response(body, media_type=kind, headers={"cache-control": "no-cache"})

    gateway = Gateway(channel)

    async def api(request: Request) -> Response:
        if not _same_origin(request):
            return error(403, "the console API answers only the console's own pages")
        response = await gateway(request)
        response.headers["cache-control"] = "no-store"
        return response

    app = Starlette(
        routes=[
            *(Route(path, asset, methods=["GET", "HEAD"]) for path in files),
            Route("/api/{method}", api, methods=["POST"]),
        ]
    )
    return _Guard(app, check_host)


def _same_origin(request: Request) -> bool:
    """A request a browser sends from another site's page says so in Origin."""
    origin = request.headers.get("origin")
    return origin is None or origin == f"{request.url.scheme}://{request.headers.get('host')}"


class _Guard:
    """Adds `HEADERS` to every answer; refuses other host names when asked to."""

    def __init__(self, app: ASGIApp, check_host: bool) -> None:
        self._app = app
        self._check_host = check_host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADERS]
            await send(message)

        if self._check_host:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if not host_is_address(host):
                refused = error(421, "open control planes answer the console only by address")
                await refused(scope, receive, with_headers)
                return
        await self._app(scope, receive, with_headers)
