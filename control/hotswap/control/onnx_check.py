"""Validates uploaded ONNX by loading it in ONNX Runtime, and reads its signature.

First, before ONNX Runtime sees the file, every tensor in it (initializers, sparse ones,
Constant nodes' attributes, subgraphs and functions) is inspected with the ``onnx`` package:
one that keeps its data in an external file is refused, whatever the installed runtime would
do with the path. Then the model is loaded from a hard link in a fresh, otherwise empty
directory, so even a reference the inspection missed would find no file to read.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from hotswap.control.domain import TensorSpec
from hotswap.control.errors import InvalidArgument


def _shape(dims: list[int | str | None]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in dims)


def _tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto a graph holds, its subgraphs' included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _attribute_tensors(node.attribute)


def _attribute_tensors(attributes: Any) -> Iterator[Any]:
    for attribute in attributes:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        for sparse in [
            *attribute.sparse_tensors,
            *([attribute.sparse_tensor] * attribute.HasField("sparse_tensor")),
        ]:
            yield from (sparse.values, sparse.indices)
        if attribute.HasField("g"):
            yield from _tensors(attribute.g)
        for graph in attribute.graphs:
            yield from _tensors(graph)


def refuse_external_data(path: Path) -> None:
    """Raises InvalidArgument if any tensor of the model at `path` points outside the file."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # the protobuf parser raises several types for bad bytes
        detail = str(exc).replace(str(path), "the model")[:300] or type(exc).__name__
        raise InvalidArgument(
            f"not a loadable ONNX model: {detail} (export it again, e.g. with skl2onnx or "
            "torch.onnx, and check it loads in onnxruntime)"
        ) from None
    tensors = itertools.chain(
        _tensors(model.graph),
        # Local functions: their nodes' attributes and their attributes' default values.
        *(_attribute_tensors(n.attribute) for f in model.functions for n in f.node),
        *(_attribute_tensors(f.attribute_proto) for f in model.functions),
        # Training graphs: runtimes may ignore them today, but they are part of the file.
        *(
            _tensors(graph)
            for info in model.training_info
            for graph in (info.initialization, info.algorithm)
        ),
    )
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            raise InvalidArgument(
                f"tensor {tensor.name!r} keeps its data in an external file ({location[:100]!r}),"
                " which hotswap does not accept: save the model with every tensor inside the "
                ".onnx file (e.g. onnx.save_model(m, path, save_as_external_data=False))"
            )


def inspect_onnx(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Checks the model at `path` for external data, then loads it; returns (inputs,
    outputs) or raises InvalidArgument."""
    refuse_external_data(path)
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
        text = str(exc).replace(str(path.parent), "").replace(str(path), "the model")
        detail = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
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
