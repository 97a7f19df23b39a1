"""Inference logs and the swap timeline of a pipeline, as the SDK and the CLI show them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from hotswap.clients._channels import Channels
from hotswap.clients._convert import from_ipc, table_to_pandas, write_arrow_file
from hotswap.clients._errors import InvalidInputError
from hotswap.clients._render import format_ms, grid_html, grid_text
from hotswap.v1 import control_pb2, types_pb2

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_DATASET = ("time", "in", "out", "check_failures")
# What dataset=["metadata"] adds (as in the Wallaroo SDK); "*" keeps every column.
METADATA_COLUMNS = (
    "metadata.last_model",
    "metadata.pipeline_version",
    "metadata.elapsed",
    "metadata.shadow_elapsed",  # shadow deploys: {challenger: ns}
    "metadata.shadow_errors",
)


def answer_exclude(
    dataset: Sequence[str] | None, dataset_exclude: Sequence[str] | None
) -> tuple[str, ...]:
    """The column groups an inference answer leaves out, from Wallaroo's `dataset` (the groups
    to return; "*" or None for all; "metadata" is always in the attrs) and `dataset_exclude`.

    Raises:
        InvalidInputError: a name that is not a column group.
    """
    wanted = ["*"] if dataset is None else list(dataset)
    excluded = list(dataset_exclude or ())
    for name in [*wanted, *excluded]:
        if name not in (*DEFAULT_DATASET, "*", "metadata"):
            raise InvalidInputError(
                f"dataset names {name!r}: use '*' or the column groups {list(DEFAULT_DATASET)}"
            )
    kept = set(DEFAULT_DATASET) if "*" in wanted else set(wanted)
    return tuple(g for g in DEFAULT_DATASET if g not in kept or g in excluded)


def to_ms(moment: datetime) -> int:
    """Milliseconds since the epoch; a naive datetime is taken as local time."""
    if not isinstance(moment, datetime):
        raise InvalidInputError(f"start and end must be datetimes, not {type(moment).__name__}")
    return int(moment.timestamp() * 1000)


def fetch_logs(
    channels: Channels,
    workspace: str,
    pipeline: str,
    limit: int,
    start: datetime | None,
    end: datetime | None,
) -> tuple[pa.Table, types_pb2.LogsResponse]:
    """Every log column, newest row first (an empty table when there are none)."""
    if (start is None) != (end is None):
        raise ValueError("logs(): pass both start and end, or neither")
    if limit < 1:
        raise ValueError(f"logs(): limit must be at least 1, got {limit}")
    request = types_pb2.GetLogsRequest(workspace=workspace, pipeline=pipeline, limit=limit)
    if start is not None and end is not None:
        request.start_ms, request.end_ms = to_ms(start), to_ms(end)
        if request.end_ms <= request.start_ms:
            raise ValueError("logs(): end must be after start")
    resp = channels.control.get_pipeline_logs(request)
    table = (
        from_ipc(resp.arrow) if resp.arrow else pa.table({"time": pa.array([], pa.timestamp("ms"))})
    )
    return table, resp


def select(table: pa.Table, dataset: Sequence[str] | None) -> pa.Table:
    """The columns of `dataset`: "time", "in", "out", "check_failures", "metadata" or "*"."""
    wanted = [*DEFAULT_DATASET, *(dataset or ())]
    if "*" in wanted:
        return table

    def kept(name: str) -> bool:
        prefix = name.split(".", 1)[0]
        if name in ("time", "check_failures"):
            return name in wanted
        if prefix in ("in", "out"):
            return prefix in wanted
        if prefix.startswith("out_"):  # a shadow challenger's outputs, `out_<model>.<output>`
            return "out" in wanted
        return "metadata" in wanted and name in METADATA_COLUMNS

    keep = [name for name in table.column_names if kept(name)]
    return table.select(keep)


def logs_result(table: pa.Table, arrow: bool) -> pa.Table | pd.DataFrame:
    return table if arrow else table_to_pandas(table)


def export(table: pa.Table, directory: str | Path, pipeline: str) -> list[Path]:
    """Writes the log rows as Arrow IPC files, one per pipeline version; returns the paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    paths = []
    if "metadata.pipeline_version" not in table.column_names or table.num_rows == 0:
        path = out / f"{pipeline}-{stamp}.arrow"
        write_arrow_file(table, path)
        return [path]
    versions = table.column("metadata.pipeline_version")
    for number in sorted(set(versions.to_pylist())):
        part = table.filter(pa.compute.equal(versions, number))
        # Columns that are all null belong to other versions' outputs.
        part = part.select([c for c in part.column_names if part.column(c).null_count < len(part)])
        path = out / f"{pipeline}-v{number}-{stamp}.arrow"
        write_arrow_file(part, path)
        paths.append(path)
    return paths


def swap_dict(swap: control_pb2.SwapRecord) -> dict[str, Any]:
    """A swap record as plain data (what ``pipeline.swaps()`` and ``hotswap swaps`` show)."""
    return {
        "swap_id": swap.swap_id,
        "kind": swap.kind,
        "from_version": swap.version_before,
        "to_version": swap.version_after,
        "started": format_ms(swap.started_ms),
        "ended": format_ms(swap.ended_ms) if swap.ended_ms else None,
        "duration_ms": swap.ended_ms - swap.started_ms if swap.ended_ms else None,
        "outcome": swap.outcome,
        "reason": swap.reason,
        "note": swap.note,
        "requested_by": swap.requested_by,
        "request_id": swap.request_id,
        "prepare_ms": round(swap.prepare_ms, 3),
        "commit_ms": round(swap.commit_ms, 3),
        "engines": [
            {
                "engine": e.engine,
                "address": e.address,
                "stage": e.stage,
                "error": e.error,
                "prepare_ms": round(e.prepare_ms, 3),
                "fetch_ms": round(e.fetch_ms, 3),
                "load_ms": round(e.load_ms, 3),
                "warmup_ms": round(e.warmup_ms, 3),
                "commit_ms": round(e.commit_ms, 3),
                "switch_us": round(e.switch_us, 3),
                "switched_at_us": e.switched_at_us,
                "reused": e.reused,
            }
            for e in swap.engines
        ],
    }


def list_swaps(channels: Channels, workspace: str, pipeline: str, limit: int) -> SwapList:
    resp = channels.control.list_swaps(
        control_pb2.ListSwapsRequest(workspace=workspace, pipeline=pipeline, limit=limit)
    )
    return SwapList(swap_dict(s) for s in resp.swaps)


def last_model_name(value: str) -> str:
    """The model name in a ``metadata.last_model`` JSON value."""
    try:
        return str(json.loads(value).get("model_name", ""))
    except (ValueError, AttributeError):
        return ""


class SwapList(list[dict[str, Any]]):
    """Swap records, newest first, that render as a table (``to_pandas()`` for a DataFrame)."""

    _HEADERS = ("started", "kind", "from", "to", "outcome", "ms", "requested_by", "reason / note")

    def _rows(self) -> list[tuple[Any, ...]]:
        return [
            (
                s["started"],
                s["kind"],
                s["from_version"],
                s["to_version"],
                s["outcome"],
                s["duration_ms"],
                s["requested_by"],
                s["reason"] or s["note"],
            )
            for s in self
        ]

    def to_pandas(self) -> pd.DataFrame:
        """One row per swap (engines as a list of dicts per row)."""
        from hotswap.clients._convert import require_pandas

        frame: pd.DataFrame = require_pandas().DataFrame(list(self))
        return frame

    def __repr__(self) -> str:
        return grid_text(self._HEADERS, self._rows())

    def _repr_html_(self) -> str:
        return grid_html(self._HEADERS, self._rows())
