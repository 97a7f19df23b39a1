"""Who may call the control plane: bearer tokens for people and services, and a separate
credential for engines.

The token file (``--tokens-file`` / ``HOTSWAP_TOKENS_FILE``) is JSON::

    {"users":   [{"name": "alice", "token": "...", "workspaces": ["housing"]},
                 {"name": "ops",   "token": "...", "workspaces": ["*"]}],
     "engines": [{"name": "fleet", "token": "..."}]}

A user token reaches the ControlPlane API for its workspaces ("*": all, including creating
workspaces); an engine token reaches only Fleet (Connect, FetchBlob). Without a token file the
control plane runs open, and says so at start.
"""

from __future__ import annotations

import contextvars
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from hotswap.control.errors import ControlError

ALL = "*"


class Unauthenticated(ControlError):
    """No token, or one the control plane does not know."""


class PermissionDenied(ControlError):
    """A known token without rights to what it asked for."""


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    engine: bool
    workspaces: frozenset[str]

    def may_use(self, workspace: str) -> bool:
        return not self.engine and (ALL in self.workspaces or workspace in self.workspaces)


# The caller of the RPC being served; set by the auth interceptor around each handler.
OPEN = Principal("anonymous", engine=True, workspaces=frozenset({ALL}))
current: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal", default=OPEN)


def require_workspace(workspace: str) -> None:
    """Raises PermissionDenied unless the current caller may use `workspace`."""
    principal = current.get()
    if principal is OPEN:
        return
    if not principal.may_use(workspace):
        raise PermissionDenied(
            f"token {principal.name!r} has no rights to workspace {workspace!r}: "
            "ask an administrator to add it to the token file"
        )


def may_see(workspace: str) -> bool:
    """Whether the current caller may see `workspace` (e.g. in a listing)."""
    principal = current.get()
    return principal is OPEN or principal.may_use(workspace)


class TokenBook:
    """The known tokens. Compared in constant time; never logged."""

    def __init__(self, principals: dict[str, Principal]) -> None:
        self._principals = principals

    @classmethod
    def load(cls, path: Path) -> TokenBook:
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read token file {path}: {exc}") from None
        principals: dict[str, Principal] = {}
        for entry in raw.get("users", []):
            principals[str(entry["token"])] = Principal(
                str(entry["name"]), engine=False, workspaces=frozenset(entry["workspaces"])
            )
        for entry in raw.get("engines", []):
            principals[str(entry["token"])] = Principal(
                str(entry["name"]), engine=True, workspaces=frozenset()
            )
        if any(len(token) < 16 for token in principals):
            raise ValueError(f"token file {path}: every token must be at least 16 characters")
        return cls(principals)

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal for an `authorization: Bearer <token>` value."""
        if not authorization or not authorization.startswith("Bearer "):
            raise Unauthenticated(
                "this control plane requires a bearer token: pass --token or set HOTSWAP_TOKEN"
            )
        presented = authorization.removeprefix("Bearer ").strip().encode()
        for token, principal in self._principals.items():
            if hmac.compare_digest(token.encode(), presented):
                return principal
        raise Unauthenticated("the bearer token is not valid for this control plane")
