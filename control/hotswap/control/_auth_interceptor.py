"""Enforces the token file (`auth.TokenFile`) at the gRPC edge: authenticates every call to the
ControlPlane and Fleet services, checks the request's workspace, and exposes the caller to
servicers through `auth.current`. Health and reflection stay open, as probes expect."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc

from hotswap.control import auth
from hotswap.service.edge import StatusTable
from hotswap.service.interceptors import Enter, GuardInterceptor

PROTECTED = {"hotswap.v1.ControlPlane": False, "hotswap.v1.Fleet": True}  # service -> engine?
DENIALS: StatusTable = {
    auth.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    auth.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


class AuthInterceptor(GuardInterceptor):
    def __init__(self, tokens: auth.TokenFile) -> None:
        super().__init__(PROTECTED.__contains__, self._admit, DENIALS)
        self._tokens = tokens

    def _admit(self, method: str, metadata: Mapping[str, str]) -> Enter:
        principal = self._tokens.book.authenticate(metadata.get("authorization"))
        engine_service = PROTECTED[method.split("/")[1]]
        if engine_service and not principal.engine:
            raise auth.PermissionDenied("only engine credentials may use the Fleet service")
        if not engine_service and principal.engine:
            raise auth.PermissionDenied("engine credentials cannot call the ControlPlane API")

        def enter(request: Any) -> None:
            auth.current.set(principal)
            workspace = getattr(request, "workspace", None)
            if isinstance(workspace, str) and workspace and not principal.may_use(workspace):
                raise auth.PermissionDenied(
                    f"token {principal.name!r} has no rights to workspace {workspace!r}"
                )

        return enter
