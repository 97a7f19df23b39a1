"""Validates uploaded ONNX by loading it in ONNX Runtime, and reads its signature.

The model is loaded from a hard link in a fresh, otherwise empty directory. ONNX Runtime
refuses external-data paths that are absolute or escape the model's directory; loading from an
empty directory also makes every relative reference fail. So a model that names external data
(e.g. another model's blob beside it in the cache) is refused at upload and never read.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnxruntime as ort

from hotswap.control.domain import TensorSpec
from hotswap.control.errors import InvalidArgument


def _shape(dims: list[int | str | None]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in dims)


def inspect_onnx(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Loads the model at `path`; returns (inputs, outputs) or raises InvalidArgument."""
    alone = Path(tempfile.mkdtemp(dir=path.parent, prefix="check-"))
    try:
        os.link(path, alone / "model.onnx")
        return _inspect(alone / "model.onnx")
    finally:
        shutil.rmtree(alone, ignore_errors=True)


def _inspect(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    # Only checking it loads: optimising the graph would just cost upload time.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises several unrelated types for bad models
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "xternal data" in detail or "No such file" in detail:
            raise InvalidArgument(
                "the model references external data files, which hotswap does not accept: "
                "save it with every tensor inside the .onnx file (e.g. onnx.save_model(m, path,"
                " save_as_external_data=False))"
            ) from None
        raise InvalidArgument(
            f"not a loadable ONNX model: {detail[:300]} (export it again, e.g. with "
            "skl2onnx or torch.onnx, and check it loads in onnxruntime)"
        ) from None
    inputs = tuple(TensorSpec(i.name, i.type, _shape(i.shape)) for i in session.get_inputs())
    outputs = tuple(TensorSpec(o.name, o.type, _shape(o.shape)) for o in session.get_outputs())
    return inputs, outputs
