"""Who may call the control plane: bearer tokens for people and services, and a separate
credential for engines.

The token file (``--tokens-file`` / ``HOTSWAP_TOKENS_FILE``) is JSON::

    {"users":   [{"name": "alice", "token": "...", "workspaces": ["housing"]},
                 {"name": "ops",   "token": "...", "workspaces": ["*"]}],
     "engines": [{"name": "fleet", "token": "...", "names": ["engine-*"]}]}

A user token reaches the ControlPlane API for its workspaces ("*": all, including creating
workspaces), and the engines' services for the same workspaces (engines learn digests of the
user tokens over the Fleet stream, never the tokens). An engine token reaches only Fleet
(Connect, FetchBlob), under the engine names its ``names`` patterns allow (fnmatch; without
``names``, any name that no other live engine holds). Without a token file the control plane
runs open, and says so at start. The file is re-read when it changes (docs/security.md).
"""

from __future__ import annotations

import contextvars
import fnmatch
import hashlib
import hmac
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from hotswap.control.errors import ControlError

log = logging.getLogger(__name__)

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
    # Engine credentials: fnmatch patterns of the engine names it may connect as; empty
    # means any name that is not live from another engine.
    engine_names: tuple[str, ...] = ()

    def may_use(self, workspace: str) -> bool:
        return not self.engine and (ALL in self.workspaces or workspace in self.workspaces)

    def may_be_engine(self, name: str) -> bool:
        if not self.engine:
            return False
        return not self.engine_names or any(
            fnmatch.fnmatchcase(name, pattern) for pattern in self.engine_names
        )


@dataclass(frozen=True, slots=True)
class Grant:
    """What an engine needs to check one user token: its digest and workspaces."""

    name: str
    token_sha256: bytes
    workspaces: frozenset[str]


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

    def grants(self) -> list[Grant]:
        """The user tokens as digests, for the engines' own token checks."""
        return sorted(
            (
                Grant(p.name, hashlib.sha256(token.encode()).digest(), p.workspaces)
                for token, p in self._principals.items()
                if not p.engine
            ),
            key=lambda g: g.name,
        )

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
            names = entry.get("names", [])
            if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
                raise ValueError(
                    f"token file {path}: engine {entry['name']!r}: `names` must "
                    "be a list of engine names or patterns such as 'engine-*'"
                )
            principals[str(entry["token"])] = Principal(
                str(entry["name"]), engine=True, workspaces=frozenset(), engine_names=tuple(names)
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


class TokenFile:
    """The token file, re-read when it changes: adding or revoking a token takes effect
    without a restart (and reaches engines with the next access push)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = self._stat()
        self.book = TokenBook.load(path)

    def _stat(self) -> tuple[int, int]:
        try:
            info = self.path.stat()
        except OSError:
            return (0, 0)
        return (info.st_mtime_ns, info.st_size)

    def reload_if_changed(self) -> bool:
        """Re-reads the file if it changed; keeps the old tokens if the new file is broken."""
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            self.book = TokenBook.load(self.path)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("token file changed but cannot be used, keeping the previous tokens: %s", exc)
            return False
        log.info("token file %s reloaded", self.path)
        return True
