"""Where tests keep what a person looks at afterwards (screenshots, query results)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def artifacts_dir(kind: str) -> Path:
    """`$HOTSWAP_TEST_ARTIFACTS/<kind>` or `tests/artifacts/<kind>` (git ignores it)."""
    root = Path(os.environ.get("HOTSWAP_TEST_ARTIFACTS") or REPO / "tests" / "artifacts")
    folder = root / kind
    folder.mkdir(parents=True, exist_ok=True)
    return folder
