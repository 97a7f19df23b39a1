"""Models of a chosen size for the cost-growth phase: random tree ensembles built directly.

Training a 100 MB forest and converting it with skl2onnx takes minutes; a random
TreeEnsembleRegressor of complete trees has the same operator, the same per-node layout and
the same load path in ONNX Runtime, is cheap to evaluate (depth-bounded) and builds in
seconds. About 34 bytes per node, so the size is set by the number of trees and their depth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

BYTES_PER_NODE = 34


def tree_ensemble(target_bytes: int, width: int = 18, seed: int = 0) -> bytes:
    depth = 13 if target_bytes <= 2_000_000 else 15
    per = 2 ** (depth + 1) - 1
    n_trees = max(1, round(target_bytes / (BYTES_PER_NODE * per)))
    internal = 2**depth - 1
    rng = np.random.default_rng(seed)
    local = np.arange(per)
    leaf = np.tile(local >= internal, n_trees)
    n = n_trees * per
    # Complete binary trees in heap order: node i's children are 2i+1 and 2i+2.
    node = helper.make_node(
        "TreeEnsembleRegressor",
        ["X"],
        ["variable"],
        domain="ai.onnx.ml",
        n_targets=1,
        post_transform="NONE",
        nodes_treeids=np.repeat(np.arange(n_trees), per),
        nodes_nodeids=np.tile(local, n_trees),
        nodes_featureids=np.where(leaf, 0, rng.integers(0, width, n)),
        nodes_values=np.where(leaf, 0, rng.standard_normal(n)).astype(np.float32),
        nodes_modes=np.where(leaf, "LEAF", "BRANCH_LEQ").tolist(),
        nodes_truenodeids=np.tile(np.where(local >= internal, 0, 2 * local + 1), n_trees),
        nodes_falsenodeids=np.tile(np.where(local >= internal, 0, 2 * local + 2), n_trees),
        target_treeids=np.repeat(np.arange(n_trees), per - internal),
        target_nodeids=np.tile(np.arange(internal, per), n_trees),
        target_ids=np.zeros(n_trees * (per - internal), np.int64),
        target_weights=rng.standard_normal(n_trees * (per - internal)).astype(np.float32),
    )
    graph = helper.make_graph(
        [node],
        "bench_trees",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, width])],
        [helper.make_tensor_value_info("variable", TensorProto.FLOAT, [None, 1])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def write_sized(out: Path, megabytes: int, variant: int) -> Path:
    path = out / f"trees_{megabytes}mb_{variant}.onnx"
    if not path.is_file():
        path.write_bytes(tree_ensemble(megabytes * 1_000_000, seed=megabytes * 10 + variant))
    return path
