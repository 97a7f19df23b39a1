"""Pipeline versions: immutable, ordered lists of model versions."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hotswap.clients._channels import Channels
from hotswap.clients._model import Model
from hotswap.clients._render import format_ms, grid_html, grid_text, kv_html, kv_text
from hotswap.clients._splits import Split, step_key
from hotswap.v1 import control_pb2, types_pb2


def list_versions(
    channels: Channels, workspace: str, pipeline: str
) -> list[types_pb2.PipelineVersion]:
    """Every version of a pipeline, oldest first (the server sends them a page at a time)."""
    versions: list[types_pb2.PipelineVersion] = []
    token = ""
    while True:
        page = channels.control.list_pipeline_versions(
            control_pb2.ListPipelineVersionsRequest(
                workspace=workspace, pipeline=pipeline, page_size=1000, page_token=token
            )
        )
        versions.extend(page.versions)
        token = page.next_page_token
        if not token:
            return versions


class PipelineVersion:
    """One immutable version of a pipeline: its number, id and steps."""

    def __init__(self, channels: Channels, proto: types_pb2.PipelineVersion) -> None:
        self._channels = channels
        self._proto = proto

    def number(self) -> int:
        """The version number: 1, 2, 3... per pipeline."""
        return self._proto.number

    def id(self) -> str:
        """The version id (a UUID)."""
        return self._proto.version_id

    def pipeline(self) -> str:
        """The pipeline's name."""
        return self._proto.pipeline

    def created(self) -> str:
        """When the version was made (UTC)."""
        return format_ms(self._proto.created_ms)

    def steps(self) -> list[Model | Split]:
        """The version's steps, in order: a Model, or a Split for a step of several."""
        steps: list[Model | Split] = [Model(self._channels, s) for s in self._proto.steps]
        for split in self._proto.splits:
            if 0 <= split.step < len(steps):
                models = [Model(self._channels, m) for m in split.models]
                steps[split.step] = Split.from_proto(models, split)
        return steps

    def step_keys(self) -> tuple[tuple[Any, ...], ...]:
        """Each step's models (and split settings): what makes two versions the same."""
        return tuple(step_key(s) for s in self.steps())

    def to_dict(self) -> dict[str, Any]:
        """The version as plain data."""
        return {
            "pipeline": self.pipeline(),
            "version": self.number(),
            "id": self.id(),
            "created": self.created(),
            "steps": [_step_dict(s) for s in self.steps()],
        }

    def _pairs(self) -> list[tuple[str, Any]]:
        return [
            ("pipeline", self.pipeline()),
            ("version", self.number()),
            ("id", self.id()),
            ("created", self.created()),
            ("steps", ", ".join(_step_name(s) for s in self.steps())),
        ]

    def __repr__(self) -> str:
        return kv_text(self._pairs())

    def _repr_html_(self) -> str:
        return kv_html(self._pairs())


class PipelineVersionList(list[PipelineVersion]):
    """A pipeline's versions, oldest first, rendered as a table with the deployed one marked."""

    _HEADERS = ("Version", "Id", "Created", "Steps", "Deployed")

    def __init__(self, versions: Iterable[PipelineVersion] = (), deployed: int = 0) -> None:
        super().__init__(versions)
        self.deployed = deployed

    def _rows(self) -> list[tuple[Any, ...]]:
        return [
            (
                v.number(),
                v.id(),
                v.created(),
                ", ".join(_step_name(s) for s in v.steps()),
                v.number() == self.deployed,
            )
            for v in self
        ]

    def __repr__(self) -> str:
        return grid_text(self._HEADERS, self._rows())

    def _repr_html_(self) -> str:
        return grid_html(self._HEADERS, self._rows())


def _step_name(step: Model | Split) -> str:
    return step.describe() if isinstance(step, Split) else step.name()


def _step_dict(step: Model | Split) -> dict[str, Any]:
    if not isinstance(step, Split):
        return {"model": step.name(), "version": step.version()}
    return {
        "split": step.kind,
        "models": [{"model": m.name(), "version": m.version()} for m in step.models],
        **({"weights": list(step.weights)} if step.weights else {}),
        **({"key": step.key} if step.key else {}),
        **({"key_values": list(step.key_values)} if step.key_values else {}),
    }
