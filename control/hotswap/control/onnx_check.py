"""Validates uploaded ONNX by loading it in ONNX Runtime, and reads its signature."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from hotswap.control.domain import TensorSpec
from hotswap.control.errors import InvalidArgument


def _shape(dims: list[int | str | None]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in dims)


def inspect_onnx(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Loads the model at `path`; returns (inputs, outputs) or raises InvalidArgument."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    # Only checking it loads: optimising the graph would just cost upload time.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises several unrelated types for bad models
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidArgument(
            f"not a loadable ONNX model: {detail[:300]} (export it again, e.g. with "
            "skl2onnx or torch.onnx, and check it loads in onnxruntime)"
        ) from None
    inputs = tuple(TensorSpec(i.name, i.type, _shape(i.shape)) for i in session.get_inputs())
    outputs = tuple(TensorSpec(o.name, o.type, _shape(o.shape)) for o in session.get_outputs())
    return inputs, outputs
