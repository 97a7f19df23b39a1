"""Immutable domain values of the control plane."""

from __future__ import annotations

import re
from dataclasses import dataclass

from hotswap.control.errors import InvalidArgument

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_name(kind: str, name: str) -> str:
    """Returns `name` if valid for a workspace, model or pipeline; else raises InvalidArgument."""
    if not _NAME.fullmatch(name):
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise InvalidArgument(
            f"invalid {kind} name {shown!r}: use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    type: str
    shape: tuple[int, ...]  # -1 for a dynamic dimension


@dataclass(frozen=True, slots=True)
class Workspace:
    name: str
    created_ms: int


@dataclass(frozen=True, slots=True)
class ModelVersion:
    workspace: str
    name: str
    version: str  # uuid
    sha256: str
    size_bytes: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    created_ms: int


SPLIT_KINDS = ("random", "key", "shadow")


@dataclass(frozen=True, slots=True)
class Split:
    """A step of several models (StepSplit). `models[0]` is the step's model in `steps`."""

    step: int
    kind: str  # one of SPLIT_KINDS
    models: tuple[ModelVersion, ...]
    weights: tuple[float, ...] = ()  # random: one per model
    key: str = ""  # random: the sticky hash key column ("" for none); key: the column
    key_values: tuple[str, ...] = ()  # key: the value of each model after the first


@dataclass(frozen=True, slots=True)
class PipelineVersion:
    workspace: str
    pipeline: str
    version_id: str  # uuid
    number: int
    steps: tuple[ModelVersion, ...]
    created_ms: int
    splits: tuple[Split, ...] = ()

    @property
    def key(self) -> str:
        return pipeline_key(self.workspace, self.pipeline)

    def models(self) -> list[ModelVersion]:
        """Every model the version runs: each step's, and its splits' other models."""
        return [*self.steps, *(m for split in self.splits for m in split.models[1:])]


@dataclass(frozen=True, slots=True)
class Deployment:
    version: PipelineVersion
    replicas: int
    engines: tuple[str, ...]  # engine names assigned to serve it


@dataclass(frozen=True, slots=True)
class Pipeline:
    workspace: str
    name: str
    created_ms: int
    updated_ms: int
    version_count: int
    deployment: Deployment | None


def pipeline_key(workspace: str, pipeline: str) -> str:
    """The engine-facing identity of a pipeline."""
    return f"{workspace}/{pipeline}"
