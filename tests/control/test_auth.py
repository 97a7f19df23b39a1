"""Tokens without a network: the token file's rules, engine-name patterns, digests for the
engines, and reloading a changed file (a broken one keeps the old tokens)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from hotswap.control import auth

ALICE = "alice-token-0123456789abcdef"
FLEET = "fleet-token-0123456789abcdef"


def _write(path: Path, users: list[dict[str, object]], engines: list[dict[str, object]]) -> None:
    path.write_text(json.dumps({"users": users, "engines": engines}))


def test_principals_rights_and_engine_names(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    _write(
        path,
        [{"name": "alice", "token": ALICE, "workspaces": ["a"]}],
        [{"name": "fleet", "token": FLEET, "names": ["engine-*"]}],
    )
    book = auth.TokenBook.load(path)
    alice = book.authenticate(f"Bearer {ALICE}")
    assert alice.may_use("a") and not alice.may_use("b") and not alice.may_be_engine("engine-1")
    fleet = book.authenticate(f"Bearer {FLEET}")
    assert fleet.may_be_engine("engine-7") and not fleet.may_be_engine("rogue")
    assert not fleet.may_use("a")
    for bad in (None, "", "Basic x", f"Bearer {ALICE}x"):
        with pytest.raises(auth.Unauthenticated):
            book.authenticate(bad)
    # Engines get digests of user tokens only, never the tokens.
    [grant] = book.grants()
    assert grant.name == "alice" and grant.token_sha256 == hashlib.sha256(ALICE.encode()).digest()


def test_short_tokens_and_bad_names_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    _write(path, [{"name": "a", "token": "short", "workspaces": ["*"]}], [])
    with pytest.raises(ValueError, match="at least 16"):
        auth.TokenBook.load(path)
    _write(path, [], [{"name": "fleet", "token": FLEET, "names": "engine-*"}])
    with pytest.raises(ValueError, match="`names` must be a list"):
        auth.TokenBook.load(path)


def test_a_changed_file_is_reloaded_and_a_broken_one_ignored(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    _write(path, [{"name": "alice", "token": ALICE, "workspaces": ["a"]}], [])
    tokens = auth.TokenFile(path)
    assert not tokens.reload_if_changed()
    _write(path, [], [])
    os.utime(path, ns=(1, 1))  # a different stamp, whatever the clock's resolution
    assert tokens.reload_if_changed()
    with pytest.raises(auth.Unauthenticated):
        tokens.book.authenticate(f"Bearer {ALICE}")
    path.write_text("{not json")
    os.utime(path, ns=(2, 2))
    assert not tokens.reload_if_changed()  # kept the previous (empty) book
    assert tokens.book.grants() == []
