"""Pipeline steps of several models, as the Wallaroo SDK stages them: random splits (A/B
tests), key splits and shadow deploys. The engine picks each row's model; each answer row
names it in ``out._model_split``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from hotswap.clients._errors import InvalidInputError
from hotswap.clients._model import Model
from hotswap.v1 import control_pb2, types_pb2

_KINDS = {
    "random": types_pb2.StepSplit.KIND_RANDOM,
    "key": types_pb2.StepSplit.KIND_KEY,
    "shadow": types_pb2.StepSplit.KIND_SHADOW,
}
_NAMES = {value: name for name, value in _KINDS.items()}


class Split:
    """One pipeline step of several models. Make one with ``Pipeline.add_random_split``,
    ``add_key_split`` or ``add_shadow_deploy`` (or their ``replace_with_`` forms)."""

    def __init__(
        self,
        kind: str,
        models: Sequence[Model],
        weights: Sequence[float] = (),
        key: str = "",
        key_values: Sequence[str] = (),
    ) -> None:
        self.kind = kind
        self.models = list(models)
        self.weights = tuple(float(w) for w in weights)
        self.key = key
        self.key_values = tuple(key_values)

    # A Split stands where a Model stands: the first model decides the step's inputs.
    def name(self) -> str:
        return self.models[0].name()

    def version(self) -> str:
        return self.models[0].version()

    def sha(self) -> str:
        return self.models[0].sha()

    def column_renames(self) -> dict[str, str]:
        return self.models[0].column_renames()

    def key_tuple(self) -> tuple[Any, ...]:
        """What makes two steps the same (for deploy's "unchanged" check)."""
        models = tuple((m.name(), m.version()) for m in self.models)
        return (self.kind, models, self.weights, self.key, self.key_values)

    def to_ref(self, step: int) -> control_pb2.SplitRef:
        return control_pb2.SplitRef(
            step=step,
            kind=_KINDS[self.kind],
            models=[control_pb2.StepRef(model=m.name(), version=m.version()) for m in self.models],
            weights=self.weights,
            key=self.key,
            key_values=self.key_values,
        )

    @classmethod
    def from_proto(cls, models: list[Model], proto: types_pb2.StepSplit) -> Split:
        return cls(
            _NAMES.get(proto.kind, "random"), models, proto.weights, proto.key, proto.key_values
        )

    def describe(self) -> str:
        """e.g. "random split rf 90 / gbr 10 (by id)", for tables."""
        names = [m.name() for m in self.models]
        if self.kind == "random":
            parts = " / ".join(f"{n} {w:g}" for n, w in zip(names, self.weights, strict=True))
            return f"random split {parts}" + (f" (by {self.key})" if self.key else "")
        if self.kind == "key":
            cases = ", ".join(f"{v}: {n}" for v, n in zip(self.key_values, names[1:], strict=True))
            return f"key split on {self.key}: {cases}, else {names[0]}"
        return f"shadow deploy {names[0]} (challengers {', '.join(names[1:])})"

    def __repr__(self) -> str:
        return f"<Split {self.describe()}>"


def random_split(
    weighted: Sequence[tuple[float, Model]], hash_key: str | None, method: str
) -> Split:
    pairs = list(weighted)
    if len(pairs) < 2:
        raise InvalidInputError(f"{method}() takes two or more (weight, model) pairs")
    weights, models = [], []
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise InvalidInputError(f"{method}() takes (weight, model) pairs, not {pair!r}")
        weight, model = pair
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise InvalidInputError(f"{method}(): a weight is a number, not {weight!r}")
        if not math.isfinite(weight) or weight < 0:
            raise InvalidInputError(f"{method}(): weights are numbers >= 0, not {weight!r}")
        weights.append(float(weight))
        models.append(check_model(model, method))
    if sum(weights) <= 0:
        raise InvalidInputError(f"{method}(): at least one weight must be above 0")
    return Split("random", models, weights, hash_key or "")


def key_split(default: Model, meta_key: str, options: Mapping[str, Model], method: str) -> Split:
    if not isinstance(meta_key, str) or not meta_key:
        raise InvalidInputError(f"{method}() needs the name of the input column to split on")
    if not options:
        raise InvalidInputError(f"{method}() needs {{value: model}} for at least one value")
    values = [str(v) for v in options]
    models = [check_model(default, method), *(check_model(m, method) for m in options.values())]
    return Split("key", models, (), meta_key, values)


def shadow_deploy(champion: Model, challengers: Sequence[Model], method: str) -> Split:
    others = [check_model(m, method) for m in challengers]
    if not others:
        raise InvalidInputError(f"{method}() needs at least one challenger model")
    return Split("shadow", [check_model(champion, method), *others])


def check_model(model: object, method: str) -> Model:
    """`model` if it is a Model; else a plain sentence saying how to get one."""
    if isinstance(model, Model):
        return model
    hint = (
        f"wl.get_model({model!r})"
        if isinstance(model, str)
        else "wl.upload_model(name, path) or wl.get_model(name)"
    )
    raise InvalidInputError(
        f"{method}() takes a Model, not {type(model).__name__} {model!r}: get one with {hint}"
    )


def step_key(step: Model | Split) -> tuple[Any, ...]:
    """What makes a staged step equal to a version's step."""
    return step.key_tuple() if isinstance(step, Split) else (step.name(), step.version())
