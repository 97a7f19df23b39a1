"""The README's code runs as written: its Python blocks (read from the file, not copied) run
in order against a live two-engine stack, from a folder laid out like a fresh clone after
`make models`; its shell blocks name only make targets and hotswap commands that exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hotswap.clients._stack import LocalStack
from hotswap.clients.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def _blocks(languages: set[str], *sections: str) -> list[str]:
    """The code blocks in `languages` in the README's sections named `sections` (all of the
    file when none are named), in order."""
    found = []
    for section in re.split(r"^## ", README, flags=re.M):
        title = section.splitlines()[0].strip()
        if sections and title not in sections:
            continue
        found += [code for lang, code in BLOCK.findall(section) if lang in languages]
    return found


def test_the_python_blocks_run_as_written(tmp_path: Path) -> None:
    pytest.importorskip("sklearn", reason="the demo models need the [train] extra")
    blocks = _blocks(
        {"python"},
        "Running it",
        "A/B tests, shadow deploys and rollouts",
        "Calling an engine from anything",
        "Over HTTP: the pipeline's URL, curl, OIP REST",
    )
    assert len(blocks) == 4
    models = tmp_path / "clone" / "examples" / "housing" / "models"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "housing" / "make_models.py"),
            "--out",
            str(models),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    script = tmp_path / "readme.py"
    script.write_text("\n\n".join(blocks))
    with LocalStack(tmp_path / "stack", engines=2) as stack:
        env = {**os.environ, "HOTSWAP_ADDRESS": stack.control_address}
        ran = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path / "clone",
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    # Version 1 answered, then version 2 (gbr) after the swap, then 1 again after the rollback.
    assert lines[0].startswith("1 ")
    assert lines[1].startswith("2 ['housing-gbr'] 127.0.0.1:")
    assert lines[2] == "1"
    assert lines[3] == "Running [1, 2]"
    assert lines[4] == "[1, 1]"  # each row of the A/B test names the one model that served it
    state, final = lines[5].split()
    assert state == "completed"  # the rollout moved the traffic to gbr by itself
    # The raw Engine.Infer call, served by the version the rollout ended on.
    assert lines[6].startswith(f"{final} ")
    # The same version over HTTP, at p.url(), in Wallaroo's pandas-records.
    assert lines[-1].startswith(f"{final} [")


def test_the_shell_blocks_name_real_targets_and_commands() -> None:
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.M))
    subparsers: Any = build_parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
    commands = set(subparsers.choices)
    checked = 0
    for code in _blocks({"bash", "sh"}):
        for line in code.splitlines():
            words = line.split("#")[0].split()
            if words[:1] == ["make"]:
                assert words[1] in targets, line
                checked += 1
            elif words[:1] == ["hotswap"]:
                assert words[1] in commands, line
                checked += 1
    assert checked >= 4
