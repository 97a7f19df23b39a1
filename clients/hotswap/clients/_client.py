"""The SDK's entry point: :class:`Client` and :class:`Workspace`."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from hotswap.clients._channels import Channels
from hotswap.clients._errors import EntityExistsError, EntityNotFoundError, InvalidInputError
from hotswap.clients._model import Framework, Model, ModelList
from hotswap.clients._pipeline import Pipeline, PipelineList
from hotswap.clients._pipeline_version import PipelineVersion, list_versions
from hotswap.clients._render import format_ms, grid_html, grid_text, kv_html, kv_text
from hotswap.clients._rpc import Security
from hotswap.v1 import control_pb2, types_pb2

DEFAULT_ADDRESS = "localhost:50051"
DEFAULT_WORKSPACE = "default"
UPLOAD_CHUNK_BYTES = 1024 * 1024

ProgressCallback = Callable[[int, int], None]


class Workspace:
    """A namespace for models and pipelines."""

    def __init__(self, channels: Channels, proto: control_pb2.Workspace) -> None:
        self._channels = channels
        self._proto = proto

    def name(self) -> str:
        """The workspace's name."""
        return self._proto.name

    def created(self) -> str:
        """When the workspace was created (UTC)."""
        return format_ms(self._proto.created_ms)

    def models(self) -> list[str]:
        """The names of the workspace's models."""
        resp = self._channels.control.list_models(
            control_pb2.ListModelsRequest(workspace=self.name())
        )
        return [m.name for m in resp.models]

    def pipelines(self) -> list[str]:
        """The names of the workspace's pipelines."""
        resp = self._channels.control.list_pipelines(
            control_pb2.ListPipelinesRequest(workspace=self.name())
        )
        return [p.name for p in resp.pipelines]

    def to_dict(self) -> dict[str, Any]:
        """The workspace as plain data."""
        return {"name": self.name(), "created": self.created()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Workspace) and other.name() == self.name()

    def __hash__(self) -> int:
        return hash(self.name())

    def __repr__(self) -> str:
        return kv_text(list(self.to_dict().items()))

    def _repr_html_(self) -> str:
        return kv_html(
            [
                *self.to_dict().items(),
                ("models", ", ".join(self.models())),
                ("pipelines", ", ".join(self.pipelines())),
            ]
        )


class WorkspaceList(list[Workspace]):
    """A list of workspaces that renders as a table."""

    def __init__(self, items: Iterable[Workspace] = ()) -> None:
        super().__init__(items)

    def __repr__(self) -> str:
        return grid_text(("name", "created"), [(w.name(), w.created()) for w in self])

    def _repr_html_(self) -> str:
        return grid_html(("name", "created"), [(w.name(), w.created()) for w in self])


class Client:
    """A connection to a hotswap control plane.

    Example:
        >>> wl = hotswap.Client()                 # $HOTSWAP_ADDRESS, else localhost:50051
        >>> ws = wl.get_workspace("ws", create_if_not_exist=True)
        >>> wl.set_current_workspace(ws)

    Until :meth:`set_current_workspace` is called, the current workspace is ``default``,
    created on first use.

    Args:
        address: The control plane's ``host:port``; defaults to ``$HOTSWAP_ADDRESS``, then
            ``localhost:50051``.
        token: Bearer token for a control plane run with ``--tokens-file``; defaults to
            ``$HOTSWAP_TOKEN``.
        tls_ca: PEM file of the CA that signed the servers' certificates (turns TLS on);
            defaults to ``$HOTSWAP_TLS_CA``.
        tls_cert: This client's PEM certificate, for mutual TLS (``$HOTSWAP_TLS_CERT``).
        tls_key: Its private key (``$HOTSWAP_TLS_KEY``).
        allow_plaintext_token: Send ``token`` without TLS to a non-loopback address (it warns);
            by default that is refused, since anyone on the network could read it
            (``$HOTSWAP_ALLOW_PLAINTEXT_TOKEN=1``).
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        token: str | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        allow_plaintext_token: bool | None = None,
    ) -> None:
        self._address = address or os.environ.get("HOTSWAP_ADDRESS") or DEFAULT_ADDRESS
        security = Security.resolve(
            os.environ, token, tls_ca, tls_cert, tls_key, allow_plaintext_token
        )
        self._channels = Channels(self._address, security)
        self._workspace: Workspace | None = None

    @property
    def address(self) -> str:
        """The control plane's address."""
        return self._address

    def close(self) -> None:
        """Closes the client's connections."""
        self._channels.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"hotswap.Client({self._address!r})"

    # --- workspaces ---------------------------------------------------------------------------

    def create_workspace(self, name: str) -> Workspace:
        """Creates a workspace; :class:`EntityExistsError` when the name is taken."""
        proto = self._channels.control.create_workspace(
            control_pb2.CreateWorkspaceRequest(name=name)
        )
        return Workspace(self._channels, proto)

    def list_workspaces(self) -> WorkspaceList:
        """Every workspace."""
        resp = self._channels.control.list_workspaces(control_pb2.ListWorkspacesRequest())
        return WorkspaceList(Workspace(self._channels, w) for w in resp.workspaces)

    def get_workspace(self, name: str, create_if_not_exist: bool = False) -> Workspace:
        """The workspace called ``name``.

        Args:
            name: The workspace's name.
            create_if_not_exist: Create it when missing instead of raising.

        Raises:
            EntityNotFoundError: When it does not exist and ``create_if_not_exist`` is false.
        """
        for ws in self.list_workspaces():
            if ws.name() == name:
                return ws
        if not create_if_not_exist:
            raise EntityNotFoundError(f"workspace {name!r} not found")
        try:
            return self.create_workspace(name)
        except EntityExistsError:  # created concurrently: fine, use it
            return self.get_workspace(name)

    def set_current_workspace(self, workspace: Workspace | str) -> Workspace:
        """Makes ``workspace`` the one models and pipelines are created in and looked up from."""
        ws = self.get_workspace(workspace) if isinstance(workspace, str) else workspace
        self._workspace = ws
        return ws

    def get_current_workspace(self) -> Workspace:
        """The current workspace (``default`` until set; created on first use)."""
        if self._workspace is None:
            self._workspace = self.get_workspace(DEFAULT_WORKSPACE, create_if_not_exist=True)
        return self._workspace

    def _ws(self) -> str:
        return self.get_current_workspace().name()

    # --- models -------------------------------------------------------------------------------

    def upload_model(
        self,
        name: str,
        path: str | Path,
        framework: Framework | str = Framework.ONNX,
        *,
        progress: ProgressCallback | None = None,
    ) -> Model:
        """Uploads an ONNX file as a new version of model ``name`` in the current workspace.

        The file is streamed in 1 MiB chunks after a header carrying its sha256 and size; the
        server checks both and loads the model before storing it.

        Args:
            name: The model's name; an existing name gets a new version.
            path: The ``.onnx`` file.
            framework: Only :attr:`Framework.ONNX`.
            progress: Called with (bytes sent, total bytes) after each chunk.

        Raises:
            InvalidInputError: A missing file, another framework, or ONNX the server rejects.
        """
        if framework not in (Framework.ONNX, Framework.ONNX.value):
            raise InvalidInputError(f"only ONNX models are served, not {framework!r}")
        file = Path(path)
        if not file.is_file():
            raise InvalidInputError(f"model file not found: {file}")
        with file.open("rb") as f:
            sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        size = file.stat().st_size
        header = control_pb2.UploadModelHeader(
            workspace=self._ws(), name=name, sha256=sha256, size_bytes=size
        )
        try:
            proto = self._channels.control.upload_model(_upload_requests(file, header, progress))
        except InvalidInputError as err:
            # The server speaks of "the model"; the user knows it by its file.
            raise InvalidInputError(f"{file}: {err.message}") from None
        return Model(self._channels, proto)

    def list_models(self) -> ModelList:
        """The current workspace's models, each at its latest version with its version count."""
        resp = self._channels.control.list_models(
            control_pb2.ListModelsRequest(workspace=self._ws())
        )
        return ModelList(Model(self._channels, m.latest, m.version_count) for m in resp.models)

    def get_model(self, name: str, version: str | None = None) -> Model:
        """Model ``name`` at ``version`` (an id), or its latest version."""
        resp = self._channels.control.get_model(
            control_pb2.GetModelRequest(workspace=self._ws(), name=name)
        )
        versions = list(resp.versions)
        if version is not None:
            versions = [v for v in versions if v.version == version]
        if not versions:
            raise EntityNotFoundError(f"model {name!r} has no version {version!r}")
        return Model(self._channels, versions[-1], len(resp.versions))

    # --- pipelines ----------------------------------------------------------------------------

    def build_pipeline(self, name: str) -> Pipeline:
        """The pipeline called ``name`` in the current workspace, created if new."""
        try:
            proto = self._channels.control.create_pipeline(
                control_pb2.CreatePipelineRequest(workspace=self._ws(), name=name)
            )
        except EntityExistsError:
            return self.get_pipeline(name)
        return Pipeline(self._channels, proto, [])

    def list_engines(self) -> list[dict[str, Any]]:
        """The engines the control plane knows: name, address, state (``Connected`` or
        ``Lost``), whether it is draining (shutting down), its placement labels, and what it
        serves (only the pipelines of workspaces this client may see)."""
        resp = self._channels.control.list_engines(control_pb2.ListEnginesRequest())
        return [
            {
                "name": e.name,
                "address": e.address,
                "state": e.state,
                "draining": e.draining,
                "labels": dict(e.labels),
                "serving": list(e.serving),
                "last_seen": format_ms(e.last_seen_ms),
            }
            for e in resp.engines
        ]

    def list_pipelines(self) -> PipelineList:
        """The current workspace's pipelines."""
        resp = self._channels.control.list_pipelines(
            control_pb2.ListPipelinesRequest(workspace=self._ws())
        )
        return PipelineList(self._pipeline(p) for p in resp.pipelines)

    def pipelines_by_name(self, name: str) -> list[Pipeline]:
        """``[pipeline]`` for the pipeline called ``name``; :class:`EntityNotFoundError` if none."""
        return [self.get_pipeline(name)]

    def get_pipeline(self, name: str, version: int | str | None = None) -> Pipeline:
        """Pipeline ``name``; with ``version`` (a number or id), its steps are that version's
        and ``deploy()`` without changes deploys it (a rollback)."""
        proto = self._channels.control.get_pipeline(
            control_pb2.GetPipelineRequest(workspace=self._ws(), name=name)
        )
        if version is None:
            return self._pipeline(proto)
        for v in self._versions(proto):
            if v.number == version or v.version_id == version:
                pinned = PipelineVersion(self._channels, v)
                return Pipeline(self._channels, proto, pinned.steps(), pinned)
        raise EntityNotFoundError(f"pipeline {name!r} has no version {version!r}")

    def _versions(self, proto: control_pb2.Pipeline) -> list[types_pb2.PipelineVersion]:
        return list_versions(self._channels, proto.workspace, proto.name)

    def _pipeline(self, proto: control_pb2.Pipeline) -> Pipeline:
        # Stage what is deployed (or else the latest version), as a reopened notebook expects.
        if proto.HasField("deployed"):
            source = proto.deployed
        elif proto.version_count:
            source = self._versions(proto)[-1]
        else:
            return Pipeline(self._channels, proto, [])
        return Pipeline(self._channels, proto, PipelineVersion(self._channels, source).steps())


def _upload_requests(
    path: Path, header: control_pb2.UploadModelHeader, progress: ProgressCallback | None
) -> Iterator[control_pb2.UploadModelRequest]:
    yield control_pb2.UploadModelRequest(header=header)
    sent = 0
    with path.open("rb") as f:
        while chunk := f.read(UPLOAD_CHUNK_BYTES):
            yield control_pb2.UploadModelRequest(chunk=chunk)
            sent += len(chunk)
            if progress is not None:
                progress(sent, header.size_bytes)
