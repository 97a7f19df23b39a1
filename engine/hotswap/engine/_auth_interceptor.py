"""Enforces the control plane's access rules (`access.Rules`) on every service of the engine
except gRPC health (probes stay open): authenticates the caller, checks the workspace a
request names, and exposes the caller to servicers through `access.current`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc

from hotswap.engine import access
from hotswap.service.edge import StatusTable
from hotswap.service.interceptors import Enter, GuardInterceptor

OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})
DENIALS: StatusTable = {
    access.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    access.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


class EngineAuthInterceptor(GuardInterceptor):
    def __init__(self, rules: access.Rules) -> None:
        super().__init__(lambda service: service not in OPEN_SERVICES, self._admit, DENIALS)
        self._rules = rules

    def _admit(self, method: str, metadata: Mapping[str, str]) -> Enter:
        caller = self._rules.authenticate(metadata.get("authorization"))

        def enter(request: Any) -> None:
            access.current.set(caller)
            workspace = getattr(request, "workspace", None)
            if isinstance(workspace, str) and workspace:
                caller.check(workspace)

        return enter
