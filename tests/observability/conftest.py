"""Observability tests: real local stacks and the tutorial's real models."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnxruntime as ort
import pandas as pd
import pyarrow as pa
import pytest

import hotswap
from hotswap.clients._convert import read_table_file

T = TypeVar("T")
MODELS = {"rf": "housingmodelcontrol", "gbr": "gbrhousingchallenger"}
_names = (f"obs{i}" for i in itertools.count())


def poll(check: Callable[[], T | None], timeout: float = 15.0, interval: float = 0.05) -> T:
    """Calls `check` until it returns something truthy; fails after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout:g}s")
        time.sleep(interval)


def reference(assets: Path, model: str, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(assets / "models" / f"{model}_model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    out = session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]
    return np.asarray(out, dtype=np.float32).reshape(len(x), -1)


def one_row(assets: Path) -> pd.DataFrame:
    return pd.DataFrame(json.loads((assets / "data" / "xtest-1.df.json").read_text()))


def xtest(assets: Path) -> np.ndarray:
    table = read_table_file(assets / "data" / "xtest-1k.arrow")[0]
    column = table.column("tensor").combine_chunks()
    return np.asarray(column.flatten().to_numpy()).reshape(-1, 18)


def tensor_table(x: np.ndarray) -> pa.Table:
    flat = pa.array(np.ascontiguousarray(x, dtype=np.float32).ravel())
    return pa.table({"tensor": pa.FixedSizeListArray.from_arrays(flat, x.shape[1])})


def setup_pipeline(
    wl: hotswap.Client, assets: Path, name: str = "housing"
) -> tuple[hotswap.Pipeline, dict[str, hotswap.Model]]:
    """A fresh workspace, the rf and gbr models, and a pipeline deployed with rf (version 1)."""
    wl.set_current_workspace(wl.create_workspace(next(_names)))
    models = {
        key: wl.upload_model(name_, assets / "models" / f"{key}_model.onnx")
        for key, name_ in MODELS.items()
    }
    pipeline = wl.build_pipeline(name).add_model_step(models["rf"]).deploy()
    return pipeline, models


@pytest.fixture
def client_factory() -> Callable[[str], hotswap.Client]:
    return hotswap.Client
