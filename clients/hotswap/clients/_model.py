"""Models: one uploaded, immutable ONNX file per version."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from hotswap.clients._channels import Channels
from hotswap.clients._errors import InvalidInputError
from hotswap.clients._render import format_ms, grid_html, grid_text, kv_html, kv_text
from hotswap.v1 import control_pb2, types_pb2


class Framework(enum.StrEnum):
    """The model format given to :meth:`Client.upload_model`. Only ONNX is served."""

    ONNX = "onnx"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One ONNX input or output: its name, ONNX Runtime type string and shape (-1 = dynamic)."""

    name: str
    type: str
    shape: tuple[int, ...]

    @classmethod
    def from_proto(cls, spec: types_pb2.TensorSpec) -> TensorSpec:
        return cls(spec.name, spec.type, tuple(spec.shape))


class Model:
    """One version of an uploaded model.

    Returned by :meth:`Client.upload_model` and :meth:`Client.list_models`; pass it to
    :meth:`Pipeline.add_model_step`.
    """

    def __init__(self, channels: Channels, proto: types_pb2.ModelVersion, version_count: int = 0):
        self._channels = channels
        self._proto = proto
        self._version_count = version_count
        self._tensor_fields: tuple[str, ...] | None = None

    def name(self) -> str:
        """The model's name, unique in its workspace."""
        return self._proto.name

    def version(self) -> str:
        """This version's id (a UUID)."""
        return self._proto.version

    def sha(self) -> str:
        """The hex sha256 of the ONNX file."""
        return self._proto.sha256

    def workspace(self) -> str:
        """The workspace the model belongs to."""
        return self._proto.workspace

    def size(self) -> int:
        """The ONNX file's size in bytes."""
        return self._proto.size_bytes

    def created(self) -> str:
        """When this version was uploaded (UTC)."""
        return format_ms(self._proto.created_ms)

    def framework(self) -> Framework:
        """The model's framework (always ONNX)."""
        return Framework.ONNX

    def inputs(self) -> list[TensorSpec]:
        """The model's ONNX inputs, in order."""
        return [TensorSpec.from_proto(s) for s in self._proto.inputs]

    def outputs(self) -> list[TensorSpec]:
        """The model's ONNX outputs, in order."""
        return [TensorSpec.from_proto(s) for s in self._proto.outputs]

    def tensor_fields(self) -> tuple[str, ...] | None:
        """The input columns bound with :meth:`configure`, or None for the default binding."""
        return self._tensor_fields

    def configure(self, tensor_fields: Sequence[str] | None = None, **_: Any) -> Model:
        """Binds input columns to the model's ONNX inputs by position.

        By default a single-input model reads the ``tensor`` column and a multi-input model reads
        columns named after its inputs. When this model is a pipeline's first step, the columns
        named here are renamed to those defaults before the request is sent. Other Wallaroo
        options (runtime, resources) are accepted and ignored.

        Args:
            tensor_fields: One column name per ONNX input, in input order.

        Returns:
            This model, so calls chain.

        Raises:
            InvalidInputError: When the count differs from the model's number of inputs.
        """
        if tensor_fields is not None:
            fields = tuple(tensor_fields)
            if len(fields) != len(self._proto.inputs):
                raise InvalidInputError(
                    f"model {self.name()!r} has {len(self._proto.inputs)} input(s) "
                    f"({', '.join(s.name for s in self._proto.inputs)}); "
                    f"got {len(fields)} tensor field(s)"
                )
            self._tensor_fields = fields
        return self

    def column_renames(self) -> dict[str, str]:
        """Input column → column the engine expects, from :meth:`configure`."""
        if self._tensor_fields is None:
            return {}
        inputs = [s.name for s in self._proto.inputs]
        targets = ["tensor"] if len(inputs) == 1 else inputs
        return {f: t for f, t in zip(self._tensor_fields, targets, strict=True) if f != t}

    def versions(self) -> ModelList:
        """Every version of this model, oldest first."""
        resp = self._channels.control.get_model(
            control_pb2.GetModelRequest(workspace=self.workspace(), name=self.name())
        )
        return ModelList(Model(self._channels, v) for v in resp.versions)

    def _pairs(self) -> list[tuple[str, Any]]:
        return [
            ("Name", self.name()),
            ("Version", self.version()),
            ("File Name", f"{self.name()}.onnx"),
            ("SHA", self.sha()),
            ("Size", f"{self.size():,} bytes"),
            ("Inputs", ", ".join(f"{s.name} {s.type}{list(s.shape)}" for s in self.inputs())),
            ("Outputs", ", ".join(f"{s.name} {s.type}{list(s.shape)}" for s in self.outputs())),
            ("Framework", self.framework().value),
            ("Workspace", self.workspace()),
            ("Created", self.created()),
        ]

    def to_dict(self) -> dict[str, Any]:
        """The model version as plain data (what ``hotswap model ... --json`` prints)."""
        return {
            "name": self.name(),
            "version": self.version(),
            "sha": self.sha(),
            "size": self.size(),
            "workspace": self.workspace(),
            "created": self.created(),
            "framework": self.framework().value,
            "inputs": [
                {"name": s.name, "type": s.type, "shape": list(s.shape)} for s in self.inputs()
            ],
            "outputs": [
                {"name": s.name, "type": s.type, "shape": list(s.shape)} for s in self.outputs()
            ],
            **({"version_count": self._version_count} if self._version_count else {}),
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Model) and other._proto.version == self._proto.version

    def __hash__(self) -> int:
        return hash(self._proto.version)

    def __repr__(self) -> str:
        return kv_text(self._pairs())

    def _repr_html_(self) -> str:
        return kv_html(self._pairs())


class ModelList(list[Model]):
    """A list of models that renders as a table."""

    _HEADERS = ("Name", "# of Versions", "Latest Version", "SHA", "Created")

    def __init__(self, models: Iterable[Model] = ()) -> None:
        super().__init__(models)

    def _rows(self) -> list[tuple[Any, ...]]:
        return [
            (m.name(), m._version_count or "", m.version(), m.sha()[:12], m.created()) for m in self
        ]

    def __repr__(self) -> str:
        return grid_text(self._HEADERS, self._rows())

    def _repr_html_(self) -> str:
        return grid_html(self._HEADERS, self._rows())
