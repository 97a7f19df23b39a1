"""Who may call this engine's services, as the control plane says.

The control plane holds the token file; engines never read it. Over the authenticated Fleet
stream it pushes `Rules`: whether tokens are required and, per user token, its sha256 and
workspaces. A call's bearer token is hashed and looked up (a dict lookup on a digest of a
secret leaks nothing useful about the secret through timing). Until the first rules arrive an
engine holding a control-plane credential refuses every call: it fails closed.

The caller of the RPC being served is `current`; `Caller.may_use` checks a workspace and
`Caller.visible` filters what a call that names no workspace may see.
"""

from __future__ import annotations

import contextvars
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from hotswap.engine.errors import EngineError

ALL = "*"


class Unauthenticated(EngineError):
    """No bearer token, or one the control plane does not know."""


class PermissionDenied(EngineError):
    """A known token without rights to the workspace it touches."""


@dataclass(frozen=True, slots=True)
class Caller:
    name: str
    workspaces: frozenset[str] | None  # None: every workspace (an open engine)

    def may_use(self, workspace: str) -> bool:
        return self.workspaces is None or ALL in self.workspaces or workspace in self.workspaces

    def check(self, workspace: str) -> None:
        if not self.may_use(workspace):
            raise PermissionDenied(
                f"token {self.name!r} has no rights to workspace {workspace!r}: ask an "
                "administrator to add it to the token file"
            )


ANYONE = Caller("anonymous", None)
current: contextvars.ContextVar[Caller] = contextvars.ContextVar("caller", default=ANYONE)


@dataclass(frozen=True, slots=True)
class Grant:
    name: str
    token_sha256: bytes
    workspaces: frozenset[str]


class Rules:
    """The latest access rules from the control plane."""

    def __init__(self, fail_closed: bool) -> None:
        # Before any rules arrive: closed when this engine belongs to a secured stack.
        self._required = fail_closed
        self._known = False
        self._grants: dict[bytes, Caller] = {}

    def update(self, required: bool, grants: Iterable[Grant]) -> None:
        self._required = required
        self._known = True
        self._grants = {g.token_sha256: Caller(g.name, g.workspaces) for g in grants}

    @property
    def required(self) -> bool:
        return self._required

    def authenticate(self, authorization: str | None) -> Caller:
        """The caller for an ``authorization: Bearer <token>`` value."""
        if not self._required:
            return ANYONE
        if not self._known:
            raise Unauthenticated(
                "this engine has not received its access rules from the control plane yet: "
                "retry once it is connected"
            )
        if not authorization or not authorization.startswith("Bearer "):
            raise Unauthenticated(
                "this engine requires a bearer token: pass the token you use with the control "
                "plane (--token or HOTSWAP_TOKEN)"
            )
        digest = hashlib.sha256(authorization[7:].strip().encode()).digest()
        caller = self._grants.get(digest)
        if caller is None:
            raise Unauthenticated("the bearer token is not valid for this engine's control plane")
        return caller
