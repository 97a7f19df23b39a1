"""What the console's tests share: a secured stack with the console on, and raw HTTP calls to
its gateway (what any browser or script sends)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hotswap.clients._rpc import Security
from hotswap.clients._stack import LocalStack

ADMIN = "admin-token-0123456789abcdef"
ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdefgh"
ENGINE = "engine-token-0123456789abcdef"
WS = "housing"
USERS = [("admin", ADMIN, "*"), ("alice", ALICE, WS), ("bob", BOB, "bob-ws")]


@contextmanager
def secured_stack(tmp_path: Path) -> Iterator[LocalStack]:
    """A control plane with a token file (admin: all, alice: housing, bob: bob-ws), one
    engine with its own credential, heartbeats every 0.25 s (live rates come quickly)."""
    tokens = tmp_path / "tokens.json"
    tokens.write_text(
        json.dumps(
            {
                "users": [{"name": n, "token": t, "workspaces": [w]} for n, t, w in USERS],
                "engines": [{"name": "fleet", "token": ENGINE, "names": ["engine-*"]}],
            }
        )
    )
    engine_token = tmp_path / "engine.token"
    engine_token.write_text(ENGINE)
    with LocalStack(
        tmp_path / "stack",
        control_args=("--tokens-file", str(tokens), "--heartbeat-interval", "0.25"),
        engine_args=("--control-token-file", str(engine_token), "--heartbeat-interval", "0.25"),
        security=Security(token=ADMIN),
    ) as stack:
        yield stack


def post(
    url: str,
    method: str,
    body: dict[str, Any] | bytes | None = None,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """POST /api/<method>: the HTTP status, headers (lower-case names) and JSON answer."""
    data = body if isinstance(body, bytes) else json.dumps(body or {}).encode()
    sent = {"Content-Type": "application/json", **(headers or {})}
    if token:
        sent["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"{url}api/{method}", data=data, headers=sent)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, _lower(answer.headers), _json(answer.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, _lower(exc.headers), _json(exc.read())


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:  # the router's own "Not Found", say
        return body.decode(errors="replace")


def _lower(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}
