"""Pipelines: ordered model steps, immutable versions, deployment (the hot swap) and inference."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import pyarrow as pa

from hotswap.clients._channels import Channels
from hotswap.clients._convert import (
    is_dataframe,
    read_table_file,
    refuse_non_finite,
    table_from_pandas,
    table_to_pandas,
)
from hotswap.clients._deploy import DeploymentConfig, DeployResult, status_dict
from hotswap.clients._errors import (
    DeploymentError,
    EntityNotFoundError,
    HotswapError,
    HotswapWarning,
    InvalidInputError,
)
from hotswap.clients._history import (
    SwapList,
    answer_exclude,
    export,
    fetch_logs,
    list_swaps,
    logs_result,
    select,
)
from hotswap.clients._infer import DEFAULT_BATCH_ROWS, Router, Served, served_attrs
from hotswap.clients._model import Model
from hotswap.clients._pipeline_version import PipelineVersion, PipelineVersionList, list_versions
from hotswap.clients._render import format_ms, grid_html, grid_text, kv_html, kv_text
from hotswap.clients._rollout import Rollout
from hotswap.clients._rpc import new_request_id
from hotswap.clients._splits import (
    Split,
    check_model,
    key_split,
    random_split,
    shadow_deploy,
    step_key,
)
from hotswap.v1 import control_pb2

if TYPE_CHECKING:
    import pandas as pd


class Pipeline:
    """A named pipeline of model steps.

    Steps added with :meth:`add_model_step` / :meth:`replace_with_model_step` are staged
    locally; :meth:`deploy` turns them into a new immutable version (unless they equal the
    version already deployed) and makes it live on the engines with a hot swap.
    """

    def __init__(
        self,
        channels: Channels,
        proto: control_pb2.Pipeline,
        steps: Sequence[Model | Split],
        pinned: PipelineVersion | None = None,
    ) -> None:
        self._channels = channels
        self._proto = proto
        self._steps = list(steps)
        self._pinned = pinned
        self._router = Router(channels, proto.workspace, proto.name)
        self._last_deploy: DeployResult | None = None

    # --- identity and state -----------------------------------------------------------------

    def name(self) -> str:
        """The pipeline's name, unique in its workspace."""
        return self._proto.name

    def workspace(self) -> str:
        """The workspace the pipeline belongs to."""
        return self._proto.workspace

    def created(self) -> str:
        """When the pipeline was created (UTC)."""
        return format_ms(self._proto.created_ms)

    def last_update(self) -> str:
        """When a version was last made or the deployment last changed (UTC)."""
        return format_ms(self._refresh().updated_ms)

    def deployed(self) -> bool:
        """Whether a version of the pipeline is deployed now."""
        return self._refresh().HasField("deployed")

    def deployed_version(self) -> PipelineVersion | None:
        """The version deployed now, if any."""
        proto = self._refresh()
        return (
            PipelineVersion(self._channels, proto.deployed) if proto.HasField("deployed") else None
        )

    def versions(self) -> PipelineVersionList:
        """Every version, oldest first."""
        versions = list_versions(self._channels, self.workspace(), self.name())
        deployed = self._refresh().deployed.number
        return PipelineVersionList((PipelineVersion(self._channels, v) for v in versions), deployed)

    def status(self) -> dict[str, Any]:
        """The deployment's live state, shaped like the tutorial's ``pipeline.status()``:
        ``{'status', 'details', 'engines': [{'ip', 'address', 'name', 'status', 'reason',
        'details', 'pipeline_statuses', 'model_statuses'}]}``, one engine entry per replica."""
        resp = self._channels.control.get_pipeline_status(
            control_pb2.GetPipelineStatusRequest(workspace=self.workspace(), pipeline=self.name())
        )
        return status_dict(resp)

    def endpoints(self) -> list[str]:
        """The engine addresses serving the deployed version now."""
        return list(self._router.addresses(refresh=True))

    def url(self) -> str:
        """The deployed pipeline's HTTP inference URL, as Wallaroo's ``pipeline.url()``: POST
        ``application/json; format=pandas-records`` or ``application/vnd.apache.arrow.file``
        to it (with ``Authorization: Bearer <token>`` on a secured stack); the answer comes
        in the same format. It names a running engine that serves HTTP (``--http-listen``).

        Raises:
            DeploymentError: the pipeline is not deployed, or no engine serving it has HTTP.
        """
        status = self._channels.control.get_pipeline_status(
            control_pb2.GetPipelineStatusRequest(workspace=self.workspace(), pipeline=self.name())
        )
        running = [e.http_address for e in status.engines if e.status == "Running"]
        if not running:
            raise DeploymentError(f"pipeline {self.name()!r} is not running: {status.details}")
        served = [address for address in running if address]
        if not served:
            raise DeploymentError(
                f"no engine serving pipeline {self.name()!r} has an HTTP port: start engines "
                "with --http-listen host:port"
            )
        scheme = "https" if self._channels.tls else "http"
        return f"{scheme}://{served[0]}/v1/api/pipelines/infer/{self.workspace()}/{self.name()}"

    def last_served(self) -> Served | None:
        """Which version (and engine) answered this object's last inference."""
        return self._router.last_served

    def last_deploy(self) -> DeployResult | None:
        """What this object's last :meth:`deploy` did and how long the swap took."""
        return self._last_deploy

    # --- staging steps ----------------------------------------------------------------------

    def steps(self) -> list[Model | Split]:
        """The staged steps (initially those of the deployed or latest version): a Model, or
        a Split for a step of several models."""
        return list(self._steps)

    def add_model_step(self, model: Model) -> Pipeline:
        """Appends a step; returns the pipeline so calls chain."""
        self._steps.append(check_model(model, "add_model_step"))
        return self

    def replace_with_model_step(self, index: int, model: Model) -> Pipeline:
        """Replaces step ``index`` (0-based); ``deploy()`` then hot-swaps it in."""
        self._check_index(index)
        self._steps[index] = check_model(model, "replace_with_model_step")
        return self

    def add_random_split(
        self, weighted: Sequence[tuple[float, Model]], hash_key: str | None = None
    ) -> Pipeline:
        """Appends an A/B step: each row goes to one model, with probability weight / total.
        With ``hash_key`` (an input column), rows with the same value always go to the same
        model. Each answer row names its model in ``out._model_split``."""
        self._steps.append(random_split(weighted, hash_key, "add_random_split"))
        return self

    def replace_with_random_split(
        self, index: int, weighted: Sequence[tuple[float, Model]], hash_key: str | None = None
    ) -> Pipeline:
        """Replaces step ``index`` with a random split (see :meth:`add_random_split`);
        ``deploy()`` makes new weights live with a hot swap."""
        self._check_index(index)
        self._steps[index] = random_split(weighted, hash_key, "replace_with_random_split")
        return self

    def add_key_split(
        self, default: Model, meta_key: str, options: Mapping[str, Model]
    ) -> Pipeline:
        """Appends a step that sends rows whose ``meta_key`` column equals a key of
        ``options`` to that model, and every other row to ``default``."""
        self._steps.append(key_split(default, meta_key, options, "add_key_split"))
        return self

    def replace_with_key_split(
        self, index: int, default: Model, meta_key: str, options: Mapping[str, Model]
    ) -> Pipeline:
        """Replaces step ``index`` with a key split (see :meth:`add_key_split`)."""
        self._check_index(index)
        self._steps[index] = key_split(default, meta_key, options, "replace_with_key_split")
        return self

    def add_shadow_deploy(self, champion: Model, challengers: Sequence[Model]) -> Pipeline:
        """Appends a step answered by ``champion``; the ``challengers`` run on the same input
        without holding up or failing the request, and their outputs go to the logs as
        ``out_<challenger>.<output>`` (with ``metadata.shadow_elapsed`` and
        ``metadata.shadow_errors``)."""
        self._steps.append(shadow_deploy(champion, challengers, "add_shadow_deploy"))
        return self

    def replace_with_shadow_deploy(
        self, index: int, champion: Model, challengers: Sequence[Model]
    ) -> Pipeline:
        """Replaces step ``index`` with a shadow deploy (see :meth:`add_shadow_deploy`)."""
        self._check_index(index)
        self._steps[index] = shadow_deploy(champion, challengers, "replace_with_shadow_deploy")
        return self

    def remove_step(self, index: int) -> Pipeline:
        """Removes step ``index`` (0-based)."""
        self._check_index(index)
        del self._steps[index]
        return self

    def clear(self) -> Pipeline:
        """Removes every staged step."""
        self._steps.clear()
        return self

    def _check_index(self, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int):
            raise InvalidInputError(
                f"a step index is a whole number (0 for the first step), not {index!r}"
            )
        if not 0 <= index < len(self._steps):
            raise InvalidInputError(
                f"pipeline {self.name()!r} has {len(self._steps)} step(s); no step {index}"
            )

    # --- versions and deployment -------------------------------------------------------------

    def create_version(self) -> PipelineVersion:
        """Makes a new immutable version from the staged steps, without deploying it."""
        if not self._steps:
            raise InvalidInputError(
                f"pipeline {self.name()!r} has no steps: add one with add_model_step(model)"
            )
        proto = self._channels.control.create_pipeline_version(
            control_pb2.CreatePipelineVersionRequest(
                workspace=self.workspace(),
                pipeline=self.name(),
                steps=[
                    control_pb2.StepRef(model=m.name(), version=m.version()) for m in self._steps
                ],
                splits=[s.to_ref(i) for i, s in enumerate(self._steps) if isinstance(s, Split)],
            )
        )
        self._pinned = PipelineVersion(self._channels, proto)
        self._refresh()
        return self._pinned

    def deploy(
        self,
        version: int | str | PipelineVersion | None = None,
        deployment_config: DeploymentConfig | None = None,
        *,
        expected_current_version: int | None = None,
    ) -> Pipeline:
        """Makes the staged steps (or ``version``) live with a two-phase hot swap.

        Without ``version``, the staged steps become a new version unless they equal the
        deployed (or pinned, or latest) version's steps. Returns once every assigned engine
        serves it: any request started afterwards is answered by it. On failure nothing that
        serves traffic changes.

        Args:
            version: A version number, id or :class:`PipelineVersion` to (re)deploy: a rollback.
            deployment_config: Replica count; see :class:`DeploymentConfigBuilder`.
            expected_current_version: Deploy only if this version number (0: none) is the one
                deployed now; otherwise raise :class:`ConcurrentDeployError`.

        Returns:
            The pipeline, so calls chain. :meth:`last_deploy` has the swap's timings.
        """
        start = time.perf_counter()
        target = self._resolve(version) if version is not None else self._version_for_staged()
        request = control_pb2.DeployRequest(
            workspace=self.workspace(),
            pipeline=self.name(),
            version=target.number(),
            replicas=deployment_config.replicas if deployment_config else 0,
        )
        if expected_current_version is not None:
            request.expected_current_version = expected_current_version
        request_id = new_request_id()
        try:
            resp = self._channels.control.deploy(request, request_id=request_id)
        finally:
            self._router.invalidate()
        wall_ms = (time.perf_counter() - start) * 1000
        self._last_deploy = DeployResult.from_proto(resp, wall_ms, request_id)
        if request.replicas and len(resp.engines) < request.replicas:
            warnings.warn(
                f"pipeline {self.name()!r} asked for {request.replicas} replicas but only "
                f"{len(resp.engines)} engine(s) are connected, so it serves on "
                f"{len(resp.engines)}; start more engines (`hotswap engine` or `hotswap up "
                "--engines N`) and the control plane gives them the pipeline as they connect",
                HotswapWarning,
                stacklevel=2,
            )
        if resp.unconfirmed_engines:
            warnings.warn(
                f"pipeline {self.name()!r} version {resp.version.number} is deployed, but "
                f"engine(s) {', '.join(resp.unconfirmed_engines)} did not confirm the switch: "
                "requests avoid them until they report the new version (see status())",
                HotswapWarning,
                stacklevel=2,
            )
        deployed = PipelineVersion(self._channels, resp.version)
        if deployed.step_keys() != tuple(step_key(m) for m in self._steps):
            self._steps = deployed.steps()  # else keep the staged Models and their configure()
        self._pinned = None
        self._refresh()
        return self

    def rollout(
        self,
        model: Model,
        steps: Sequence[float] = (5, 25, 50, 100),
        step_seconds: float = 60,
        max_error_rate: float = 0.01,
        max_latency_ratio: float = 1.5,
        *,
        index: int = 0,
        min_requests: int = 20,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Rollout:
        """Moves step ``index``'s traffic to ``model`` in steps (percent of rows), each a hot
        swap. The control plane advances when a step's time is up and ``model`` held the
        limits over at least ``min_requests`` requests, and rolls back at once (a hot swap to
        the version deployed now) when it fails more than ``max_error_rate`` of its requests
        or takes more than ``max_latency_ratio`` times the current model's time a row. Each
        step is in :meth:`swaps` with the numbers that decided it.

        Returns:
            The :class:`Rollout` (``state()``, ``steps()``, ``wait()``); with ``wait=True``,
            once it has ended.
        """
        rollout = Rollout(
            self._channels,
            self._channels.control.start_rollout(
                control_pb2.StartRolloutRequest(
                    workspace=self.workspace(),
                    pipeline=self.name(),
                    model=control_pb2.StepRef(
                        model=check_model(model, "rollout").name(), version=model.version()
                    ),
                    step=index,
                    percents=list(steps),
                    step_seconds=step_seconds,
                    max_error_rate=max_error_rate,
                    max_latency_ratio=max_latency_ratio,
                    min_requests=min_requests,
                )
            ),
        )
        self._router.invalidate()
        return rollout.wait(timeout) if wait else rollout

    def rollout_status(self) -> Rollout:
        """The pipeline's newest rollout, running or ended."""
        return Rollout(
            self._channels,
            self._channels.control.get_rollout(
                control_pb2.GetRolloutRequest(workspace=self.workspace(), pipeline=self.name())
            ),
        )

    def abort_rollout(self, reason: str = "") -> Rollout:
        """Stops the running rollout and swaps back to the version deployed before it."""
        try:
            return Rollout(
                self._channels,
                self._channels.control.abort_rollout(
                    control_pb2.AbortRolloutRequest(
                        workspace=self.workspace(), pipeline=self.name(), reason=reason
                    )
                ),
            )
        finally:
            self._router.invalidate()

    def undeploy(self) -> Pipeline:
        """Stops serving the pipeline and frees its sessions on every engine."""
        try:
            resp = self._channels.control.undeploy(
                control_pb2.UndeployRequest(workspace=self.workspace(), pipeline=self.name())
            )
        finally:
            self._router.invalidate()
        if resp.unconfirmed_engines:
            warnings.warn(
                f"pipeline {self.name()!r} is undeployed, but engine(s) "
                f"{', '.join(resp.unconfirmed_engines)} did not confirm releasing it yet; they "
                "release it when they next hear from the control plane",
                HotswapWarning,
                stacklevel=2,
            )
        self._refresh()
        return self

    def _resolve(self, version: int | str | PipelineVersion) -> PipelineVersion:
        if isinstance(version, PipelineVersion):
            return version
        for v in self.versions():
            if v.number() == version or v.id() == version:
                return v
        raise EntityNotFoundError(f"pipeline {self.name()!r} has no version {version!r}")

    def _version_for_staged(self) -> PipelineVersion:
        if not self._steps and self._pinned is not None:
            return self._pinned
        keys = tuple(step_key(m) for m in self._steps)
        candidate = self._pinned or self.deployed_version()
        if candidate is None and self._proto.version_count:
            candidate = self.versions()[-1]
        if candidate is not None and candidate.step_keys() == keys:
            return candidate
        return self.create_version()

    # --- inference ----------------------------------------------------------------------------

    @overload
    def infer(
        self,
        data: pd.DataFrame,
        timeout: float | None = ...,
        *,
        batch_rows: int = ...,
        allow_nan: bool = ...,
        dataset: Sequence[str] | None = ...,
        dataset_exclude: Sequence[str] | None = ...,
    ) -> pd.DataFrame: ...
    @overload
    def infer(
        self,
        data: pa.Table | pa.RecordBatch,
        timeout: float | None = ...,
        *,
        batch_rows: int = ...,
        allow_nan: bool = ...,
        dataset: Sequence[str] | None = ...,
        dataset_exclude: Sequence[str] | None = ...,
    ) -> pa.Table: ...
    def infer(
        self,
        data: pd.DataFrame | pa.Table | pa.RecordBatch,
        timeout: float | None = None,
        *,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        allow_nan: bool = False,
        dataset: Sequence[str] | None = None,
        dataset_exclude: Sequence[str] | None = None,
    ) -> pd.DataFrame | pa.Table:
        """Runs the deployed pipeline on ``data``.

        Args:
            data: A pandas DataFrame (a ``tensor`` column of number lists, as in the tutorial),
                a ``pyarrow.Table`` or a ``pyarrow.RecordBatch``.
            timeout: Seconds to wait for each request (default 15); on expiry
                :class:`InferenceTimeoutError` says what to do.
            batch_rows: Inputs with more rows are sent as several requests.
            allow_nan: Send NaN and infinite input values as they are. By default they are
                refused with :class:`InvalidInputError` naming the column and row, since
                most models turn them into wrong answers without a word; allow them for
                models that read NaN as "missing" (XGBoost does).
            dataset: The column groups to return, as in the Wallaroo SDK: ``["*"]`` (the
                default) or some of ``"time"``, ``"in"``, ``"out"``, ``"check_failures"``.
            dataset_exclude: Groups to leave out, e.g. ``["in"]``: the engine then does not
                send your inputs back (faster for big batches). The log keeps them.

        Returns:
            pandas in, pandas out (``out.<name>`` columns hold a list per row, float32 shown
            the shortest way: 718013.7); Arrow in, ``pyarrow.Table`` out. Which version served
            is in ``DataFrame.attrs`` / the schema metadata and :meth:`last_served`.
        """
        exclude = answer_exclude(dataset, dataset_exclude)
        if is_dataframe(data):
            table = table_from_pandas(data)
            return self._to_pandas(
                self._infer_arrow(table, timeout, batch_rows, allow_nan, exclude)
            )
        if isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        if not isinstance(data, pa.Table):
            raise InvalidInputError(
                f"infer() takes a pandas DataFrame or a pyarrow Table/RecordBatch, not "
                f"{type(data).__name__}; for files use infer_from_file(path)"
            )
        return self._infer_arrow(data, timeout, batch_rows, allow_nan, exclude)

    def infer_from_file(
        self,
        path: str | Path,
        data_format: Literal["pandas", "arrow"] | None = None,
        timeout: float | None = None,
        *,
        allow_nan: bool = False,
    ) -> pd.DataFrame | pa.Table:
        """Runs the pipeline on an ``.arrow`` (IPC file or stream) or ``.df.json`` file.

        Args:
            path: The input file.
            data_format: What to return; by default pandas for JSON and Arrow for ``.arrow``.
            timeout: As for :meth:`infer`.
            allow_nan: As for :meth:`infer`.
        """
        table, natural = read_table_file(path)
        result = self._infer_arrow(table, timeout, DEFAULT_BATCH_ROWS, allow_nan)
        if (data_format or natural) == "pandas":
            return self._to_pandas(result)
        return result

    def _infer_arrow(
        self,
        table: pa.Table,
        timeout: float | None,
        batch_rows: int,
        allow_nan: bool,
        exclude: tuple[str, ...] = (),
    ) -> pa.Table:
        if batch_rows < 1:
            raise InvalidInputError(f"batch_rows must be at least 1, got {batch_rows}")
        if not allow_nan:
            refuse_non_finite(table)
        renames = self._steps[0].column_renames() if self._steps else {}
        if renames:
            table = table.rename_columns([renames.get(n, n) for n in table.column_names])
        return self._router.infer_table(
            table, timeout=timeout, batch_rows=batch_rows, exclude=exclude
        )

    def _to_pandas(self, table: pa.Table) -> pd.DataFrame:
        df = table_to_pandas(table)
        df.attrs.update(served_attrs(self._router.last_served))
        return df

    # --- observability ------------------------------------------------------------------------

    def logs(
        self,
        limit: int = 100,
        start: datetime | None = None,
        end: datetime | None = None,
        arrow: bool = False,
        dataset: Sequence[str] | None = None,
    ) -> pd.DataFrame | pa.Table:
        """The pipeline's inference logs from every engine, newest row first.

        Args:
            limit: Most rows to return (after merging the engines' logs).
            start: With ``end``: only rows inferred at or after this time.
            end: With ``start``: only rows inferred before this time.
            arrow: Return a ``pyarrow.Table`` instead of a pandas DataFrame.
            dataset: Extra column groups: ``["metadata"]`` adds ``metadata.last_model``,
                ``metadata.pipeline_version`` and ``metadata.elapsed`` (ns); ``["*"]`` keeps
                every column (also ``metadata.models``, ``metadata.engine``, ...).

        Raises:
            ValueError: Only one of ``start`` and ``end``, or ``end`` not after ``start``.
        """
        table, _ = fetch_logs(self._channels, self.workspace(), self.name(), limit, start, end)
        return logs_result(select(table, dataset), arrow)

    def export_logs(
        self,
        directory: str | Path,
        limit: int = 100_000,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> list[Path]:
        """Writes the logs (every column) as Arrow IPC files, one per pipeline version.

        Returns:
            The files written.
        """
        table, _ = fetch_logs(self._channels, self.workspace(), self.name(), limit, start, end)
        return export(table, directory, self.name())

    def swaps(self, limit: int = 100) -> SwapList:
        """The swap timeline, newest first: every deploy, rollback and undeploy with its
        outcome, reason, who asked, and per-engine stages and timings (``.to_pandas()``)."""
        return list_swaps(self._channels, self.workspace(), self.name(), limit)

    # --- rendering ----------------------------------------------------------------------------

    def _refresh(self) -> control_pb2.Pipeline:
        self._proto = self._channels.control.get_pipeline(
            control_pb2.GetPipelineRequest(workspace=self.workspace(), name=self.name())
        )
        return self._proto

    def to_dict(self) -> dict[str, Any]:
        """The pipeline as plain data (what ``hotswap pipeline ... --json`` prints)."""
        p = self._proto
        return {
            "name": p.name,
            "workspace": p.workspace,
            "created": format_ms(p.created_ms),
            "last_updated": format_ms(p.updated_ms),
            "deployed": p.HasField("deployed"),
            "deployed_version": p.deployed.number if p.HasField("deployed") else None,
            "replicas": p.replicas,
            "versions": p.version_count,
            "steps": [m.name() for m in self._steps],
        }

    def _pairs(self) -> list[tuple[str, Any]]:
        with contextlib.suppress(HotswapError):  # show what we last knew rather than fail
            self._refresh()
        d = self.to_dict()
        return [
            ("name", d["name"]),
            ("version", self._proto.deployed.version_id if d["deployed"] else ""),
            ("created", d["created"]),
            ("last_updated", d["last_updated"]),
            ("deployed", d["deployed"]),
            ("deployed_version", d["deployed_version"]),
            ("replicas", d["replicas"]),
            ("versions", d["versions"]),
            ("steps", ", ".join(d["steps"])),
        ]

    def __repr__(self) -> str:
        return kv_text(self._pairs())

    def _repr_html_(self) -> str:
        return kv_html(self._pairs())


class PipelineList(list[Pipeline]):
    """A list of pipelines that renders as a table."""

    _HEADERS = ("name", "created", "last_updated", "deployed", "versions", "steps")

    def _rows(self) -> list[tuple[Any, ...]]:
        rows = []
        for p in self:
            d = p.to_dict()
            rows.append(
                (
                    d["name"],
                    d["created"],
                    d["last_updated"],
                    d["deployed"],
                    d["versions"],
                    ", ".join(d["steps"]),
                )
            )
        return rows

    def __repr__(self) -> str:
        return grid_text(self._HEADERS, self._rows())

    def _repr_html_(self) -> str:
        return grid_html(self._HEADERS, self._rows())
