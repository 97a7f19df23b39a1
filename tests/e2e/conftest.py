"""End-to-end fixtures: a real local stack (separate processes on loopback ports)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from hotswap.clients._stack import LocalStack
from hotswap.v1 import control_pb2 as c
from tests.e2e import _api

MODELS = ("rf", "gbr", "xgb")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LocalStack]:
    with LocalStack(tmp_path / "stack", engines=1) as running:
        yield running


@pytest.fixture
def stack2(tmp_path: Path) -> Iterator[LocalStack]:
    """Two engines; a short prepare timeout so a stalled engine aborts a deploy quickly."""
    with LocalStack(
        tmp_path / "stack", engines=2, control_args=("--prepare-timeout", "3")
    ) as running:
        yield running


@pytest.fixture
def xtest(assets: Path) -> np.ndarray:
    table = pa.ipc.open_file(assets / "data" / "xtest-1k.arrow").read_all()
    column = table.column("tensor").combine_chunks()
    return np.asarray(column.flatten().to_numpy()).reshape(-1, 18)


def seed_models(stub: Any, assets: Path, pipeline: str = "housing") -> dict[str, Any]:
    """Workspace, the tutorial's three models and an empty pipeline."""
    stub.CreateWorkspace(c.CreateWorkspaceRequest(name=_api.WS))
    uploaded = {
        m: _api.upload(stub, m, (assets / "models" / f"{m}_model.onnx").read_bytes())
        for m in MODELS
    }
    stub.CreatePipeline(c.CreatePipelineRequest(workspace=_api.WS, name=pipeline))
    return uploaded
