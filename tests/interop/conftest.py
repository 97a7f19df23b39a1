"""Interop fixtures: a live local stack with the tutorial's housing pipeline deployed, and
clients nobody here wrote."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from hotswap.clients._stack import LocalStack
from tests.e2e import _api
from tests.e2e.conftest import seed_models
from tests.interop._triton import Triton

PIPELINE = "housing"


@dataclass
class Deployed:
    stack: LocalStack
    control: Any  # a ControlPlane stub
    engine: str  # the engine's address
    versions: dict[str, int]  # model -> the pipeline version number serving it alone


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LocalStack]:
    with LocalStack(tmp_path / "stack", engines=1) as running:
        yield running


@pytest.fixture
def deployed(stack: LocalStack, assets: Path) -> Deployed:
    """The tutorial's three models as versions 1 (rf), 2 (gbr), 3 (xgb) of `housing`; version
    1 deployed."""
    control = _api.control(stack.control_address)
    seed_models(control, assets, PIPELINE)
    versions = {m: _api.new_version(control, PIPELINE, m).number for m in ("rf", "gbr", "xgb")}
    _api.deploy(control, PIPELINE, versions["rf"])
    return Deployed(stack, control, stack.engine_addresses[0], versions)


@pytest.fixture
def triton(stack: LocalStack, tmp_path: Path) -> Iterator[Triton]:
    # Only looked for: importing it here would clash with the engine's generated code.
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient[grpc] (a dev dependency) is not installed")
    client = Triton(stack.engine_addresses[0], tmp_path / "triton.log")
    yield client
    client.close()


@pytest.fixture(scope="session")
def xtest_rows(assets: Path) -> np.ndarray:
    """The tutorial's 1,000 test rows, [1000, 18] float32."""
    table = pa.ipc.open_file(assets / "data" / "xtest-1k.arrow").read_all()
    column = table.column("tensor").combine_chunks()
    return np.asarray(column.flatten().to_numpy(), dtype=np.float32).reshape(-1, 18)
