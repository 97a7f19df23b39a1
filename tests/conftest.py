"""Fixtures shared by every test package: where the tutorial's real models and inputs live."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_ASSETS = REPO.parent / "shared" / "assets"


@pytest.fixture(scope="session")
def assets() -> Path:
    """`../shared/assets` (the Wallaroo tutorial's models and inputs); skips when absent."""
    if not (SHARED_ASSETS / "models" / "rf_model.onnx").is_file():
        pytest.skip(
            f"tutorial assets not found at {SHARED_ASSETS} (CI links ../shared beside the repo)"
        )
    return SHARED_ASSETS
