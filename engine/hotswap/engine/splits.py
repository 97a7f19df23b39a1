"""Steps of several models: which model serves each row, and what each model served.

A split step (random by weight, random but sticky by a key column, or by a key's value) picks
one model per row inside the engine, so a request is still served wholly by one pipeline
version, and a weight change is an ordinary hot swap. A shadow step answers with its first
model (the champion) and runs the others (the challengers) on the same input later, in the
inference log's writer thread: they never hold up or fail a request.

Routing is a pure function of the step, the request's key column and a random draw; the
runtime (`runtime.py`) runs the chosen models and puts their rows back in request order.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from hotswap.engine.arrow_io import Array
from hotswap.engine.errors import InvalidInput

__all__ = ["KINDS", "ModelStats", "Router", "SplitSpec", "model_label"]

KINDS = ("random", "key", "shadow")
"""What a split step can be (StepSplit.Kind, lower case and without the prefix)."""


@dataclass(frozen=True, slots=True)
class ArmModel:
    """One model of a split step: a model version and its local, sha-verified ONNX file."""

    model_name: str
    model_version: str
    sha256: str
    path: Path


@dataclass(frozen=True, slots=True)
class SplitSpec:
    """A step of several models (StepSplit). `models[0]` is the step's own model."""

    step: int
    kind: str  # one of KINDS
    models: tuple[ArmModel, ...]
    weights: tuple[float, ...] = ()
    key: str = ""
    key_values: tuple[str, ...] = ()

    def check(self) -> str:
        """Why this split cannot be served ("" when it can)."""
        if self.kind not in KINDS:
            return f"step {self.step} has an unknown split kind {self.kind!r}"
        if len(self.models) < 2:
            return f"step {self.step} is a {self.kind} split of fewer than two models"
        if self.kind == "random":
            weights = self.weights
            if len(weights) != len(self.models) or any(
                not np.isfinite(w) or w < 0 for w in weights
            ):
                return f"step {self.step}: a random split needs one weight >= 0 per model"
            if sum(weights) <= 0:
                return f"step {self.step}: a random split needs a weight above 0"
        if self.kind == "key" and (not self.key or len(self.key_values) != len(self.models) - 1):
            return (
                f"step {self.step}: a key split needs a key column and a value for each model "
                "after the first"
            )
        return ""


def model_label(model: ArmModel) -> str:
    """The model as `out._model_split` names it: Wallaroo's JSON of name, version and sha."""
    return json.dumps(
        {"name": model.model_name, "version": model.model_version, "sha": model.sha256},
        separators=(",", ":"),
    )


class ModelStats:
    """What one model of a split or shadow step served: plain counts under one lock, read by
    heartbeats (a rollout's evidence) and by the metrics scrape."""

    __slots__ = ("_lock", "elapsed_ns", "errors", "requests", "rows")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.rows = 0
        self.errors = 0
        self.elapsed_ns = 0

    def record(self, rows: int, elapsed_ns: int, failed: bool) -> None:
        with self._lock:
            self.requests += 1
            self.rows += rows
            self.elapsed_ns += elapsed_ns
            self.errors += failed

    def record_many(self, requests: int, rows: int, elapsed_ns: int, failed: int) -> None:
        """A run of several requests at once (shadow challengers)."""
        with self._lock:
            self.requests += requests
            self.rows += rows
            self.elapsed_ns += elapsed_ns
            self.errors += failed

    def reset(self) -> None:
        with self._lock:
            self.requests = self.rows = self.errors = self.elapsed_ns = 0

    def snapshot(self) -> tuple[int, int, int, int]:
        """(requests, rows, errors, elapsed_ns), consistent with each other."""
        with self._lock:
            return self.requests, self.rows, self.errors, self.elapsed_ns


_rng = threading.local()


def _generator() -> np.random.Generator:
    # numpy generators are not thread-safe; the inference threads each get their own.
    generator: np.random.Generator | None = getattr(_rng, "generator", None)
    if generator is None:
        generator = _rng.generator = np.random.default_rng()
    return generator


class Router:
    """Chooses the model of each row for one random or key split."""

    __slots__ = ("_bounds", "_by_value", "_kind", "key", "label")

    def __init__(self, split: SplitSpec, label: str) -> None:
        self._kind = split.kind
        self.key = split.key
        self.label = label
        # Scaled by the largest first: weights near the float limit must not sum to inf.
        weights = np.asarray(split.weights or (1.0,), dtype=np.float64)
        weights = weights / weights.max()
        # A draw u in [0, 1) goes to the first model whose cumulative share exceeds u.
        self._bounds = np.cumsum(weights / weights.sum())[:-1]
        self._by_value = {value: i + 1 for i, value in enumerate(split.key_values)}

    def route(self, keys: Any, n: int) -> Array | int:
        """Each row's model index, or one index for all `n` rows. `keys` is the request's key
        column (numpy or Arrow), None when the split has no key.

        Without a key, one draw picks the model of the whole request: the weights hold over
        many requests, and each model's time is measured on whole requests, so a rollout
        compares like with like (per-row draws spread a call's fixed cost over ~5 rows of a
        5% challenger against ~95 of the champion, doubling its apparent time a row)."""
        if self._kind == "random" and not self.key:
            return int(np.searchsorted(self._bounds, _generator().random(), side="right"))
        values = self._values(keys, n)
        try:
            uniques, inverse = np.unique(values, return_inverse=True)
        except TypeError:  # an object column of mixed types (OIP): not comparable
            raise InvalidInput(
                f"{self.label} splits rows by column {self.key!r}: its values are of mixed "
                "types; send strings or integers"
            ) from None
        if self._kind == "key":
            chosen = np.array([self._by_value.get(str(u), 0) for u in uniques.tolist()], np.intp)
        else:
            chosen = np.searchsorted(self._bounds, [_unit(u) for u in uniques.tolist()], "right")
        if len(uniques) == 1:
            return int(chosen[0])
        return chosen[inverse.reshape(-1)]

    def _values(self, keys: Any, n: int) -> Array:
        what = f"{self.label} splits rows by column {self.key!r}"
        if keys is None:
            raise InvalidInput(f"{what}: the request has no such column; add it to every row")
        if isinstance(keys, pa.ChunkedArray):
            keys = keys.combine_chunks()
        if isinstance(keys, pa.Array):
            if keys.null_count:
                raise InvalidInput(f"{what}: it has nulls; give every row a value")
            if not (
                pa.types.is_integer(keys.type)
                or pa.types.is_string(keys.type)
                or pa.types.is_large_string(keys.type)
            ):
                raise InvalidInput(f"{what}: it is {keys.type}; use a string or integer column")
            values: Array = keys.to_numpy(zero_copy_only=False)
        else:
            values = np.asarray(keys)
            if values.dtype.kind == "S":  # OIP BYTES tensors: the values are UTF-8 text
                values = np.char.decode(values, "utf-8", "replace")
            elif values.dtype.kind == "O":
                values = np.array(
                    [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in values],
                    object,
                )
            if values.ndim != 1 or values.dtype.kind not in "iuUO":
                raise InvalidInput(
                    f"{what}: it holds {values.dtype} values of shape {list(values.shape[1:])} "
                    "a row; use a string or integer column of one value a row"
                )
        if len(values) != n:
            raise InvalidInput(f"{what}: it has {len(values)} values for {n} rows")
        return values


def _unit(value: Any) -> float:
    """A stable number in [0, 1) for a key value: equal values, equal numbers, on every
    engine and across restarts (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(str(value).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64
