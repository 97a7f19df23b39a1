"""Checks of split and shadow steps, before a pipeline version is made of them.

The engine checks again when it builds the sessions (what ONNX Runtime reports is final);
checking here, against the signatures recorded at upload, turns a mistake into an
INVALID_ARGUMENT the caller sees at once instead of a failed deploy later.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from hotswap.control.domain import SPLIT_KINDS, ModelVersion, Split, TensorSpec
from hotswap.control.errors import InvalidArgument

# Bounds on what one version may hold: each model is a session on every engine serving it,
# and every name is resolved in the store while the caller waits.
MAX_STEPS = 64
MAX_MODELS = 16
MAX_KEY_CHARS = 256


@dataclass(frozen=True, slots=True)
class SplitRequest:
    """A split as a caller asks for it: models by (name, version or "")."""

    step: int
    kind: str
    models: tuple[tuple[str, str], ...]
    weights: tuple[float, ...] = ()
    key: str = ""
    key_values: tuple[str, ...] = ()


def check_sizes(steps: int, splits: Sequence[SplitRequest]) -> None:
    """Raises InvalidArgument for a version too big to make, before any name is looked up."""
    if steps > MAX_STEPS:
        raise InvalidArgument(f"a pipeline version has at most {MAX_STEPS} steps, not {steps}")
    if len(splits) > steps:
        raise InvalidArgument(
            f"{len(splits)} splits for {steps} step(s): a step has at most one split"
        )
    for s in splits:
        if max(len(s.models), len(s.weights), len(s.key_values) + 1) > MAX_MODELS:
            raise InvalidArgument(
                f"the split of step {s.step} has more than {MAX_MODELS} models, weights or "
                "key values"
            )


def check_split(split: Split, steps: Sequence[ModelVersion]) -> None:
    """Raises InvalidArgument, saying what to change, unless `split` can be served."""
    where = f"the split of step {split.step}"
    if not 0 <= split.step < len(steps):
        raise InvalidArgument(
            f"a split names step {split.step}, but the pipeline has {len(steps)} step(s) "
            "(steps count from 0)"
        )
    if split.kind not in SPLIT_KINDS:
        raise InvalidArgument(f"{where} has no kind: use random, key or shadow")
    if not 2 <= len(split.models) <= MAX_MODELS:
        raise InvalidArgument(f"{where} has {len(split.models)} model(s): give 2 to {MAX_MODELS}")
    first = split.models[0]
    if first.version != steps[split.step].version:
        raise InvalidArgument(
            f"{where} starts with {first.name!r} but step {split.step} is "
            f"{steps[split.step].name!r}: a split's first model is its step's"
        )
    names = [m.name for m in split.models]
    if split.kind != "key" and len(set(names)) != len(names):
        # A key split may send several values to one model; a random split's weights and a
        # shadow's log columns go by model.
        raise InvalidArgument(f"{where} names a model twice ({', '.join(names)}): each once")
    if len(split.key) > MAX_KEY_CHARS or any(len(v) > MAX_KEY_CHARS for v in split.key_values):
        raise InvalidArgument(f"{where}: keys and key values are at most {MAX_KEY_CHARS} chars")
    if split.kind == "random":
        weights = split.weights
        if len(weights) != len(split.models):
            raise InvalidArgument(
                f"{where} has {len(weights)} weight(s) for {len(split.models)} models: one each"
            )
        if any(not math.isfinite(w) or w < 0 for w in weights) or not 0 < sum(weights) < math.inf:
            raise InvalidArgument(
                f"{where} has weights {list(weights)}: each must be a number >= 0, one above 0"
            )
        if split.key_values:
            raise InvalidArgument(f"{where} is random: key values belong to a key split")
    elif split.kind == "key":
        if not split.key:
            raise InvalidArgument(f"{where} is a key split without a key column: name one")
        if len(split.key_values) != len(split.models) - 1:
            raise InvalidArgument(
                f"{where} has {len(split.key_values)} key value(s) for "
                f"{len(split.models) - 1} model(s) after the default: one each"
            )
        if len(set(split.key_values)) != len(split.key_values):
            raise InvalidArgument(f"{where} names a key value twice: each selects one model")
        if split.weights:
            raise InvalidArgument(f"{where} is a key split: weights belong to a random split")
    elif split.weights or split.key or split.key_values:
        raise InvalidArgument(f"{where} is a shadow deploy: it takes no weights or keys")
    for model in split.models[1:]:
        _check_fits(where, first, model, same_outputs=split.kind != "shadow")


def _check_fits(where: str, first: ModelVersion, model: ModelVersion, same_outputs: bool) -> None:
    """`model` must take `first`'s inputs (by position) and, for a split, give its outputs."""
    pairs = [("inputs", first.inputs, model.inputs)]
    if same_outputs:
        pairs.append(("outputs", first.outputs, model.outputs))
    for what, theirs, mine in pairs:
        if [_kind(s) for s in theirs] != [_kind(s) for s in mine]:
            raise InvalidArgument(
                f"{where}: model {model.name!r} {what} {_show(mine)} do not match "
                f"{first.name!r}'s {_show(theirs)}; every model of a split takes (and, unless "
                "it is a shadow, gives) what the first one does"
            )


def _kind(spec: TensorSpec) -> tuple[str, tuple[int, ...]]:
    """Type and row shape, with dynamic dimensions left open."""
    return spec.type, tuple(d if d >= 0 else -1 for d in spec.shape[1:])


def _show(specs: Sequence[TensorSpec]) -> str:
    return "[" + ", ".join(f"{s.type} {list(s.shape)}" for s in specs) + "]"
