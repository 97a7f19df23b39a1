"""Conversions between what users hold (pandas DataFrames, Arrow tables, files) and the Arrow IPC
bytes the engines speak. pandas is optional: it is imported only when a DataFrame is involved.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.ipc

from hotswap.clients._errors import InvalidInputError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "check_result_path",
    "from_ipc",
    "is_dataframe",
    "read_table_file",
    "records_to_table",
    "refuse_non_finite",
    "require_pandas",
    "shortest_float32",
    "table_from_pandas",
    "table_to_pandas",
    "table_to_records",
    "to_ipc",
    "write_arrow_file",
    "write_result",
]


def require_pandas() -> Any:
    """Imports pandas, or says how to install it."""
    try:
        import pandas
    except ImportError:  # pragma: no cover - the dev environment has pandas
        raise InvalidInputError(
            "pandas is not installed: `pip install 'hotswap[pandas]'`, or pass a pyarrow.Table"
        ) from None
    return pandas


def is_dataframe(data: object) -> bool:
    """True for a pandas DataFrame, without importing pandas when nobody else has."""
    pd = sys.modules.get("pandas")
    return pd is not None and isinstance(data, pd.DataFrame)


def shortest_float32(values: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Widens float32 values to the float64 numbers whose shortest repr round-trips to the same
    float32, so that 718013.6875 (a float32) shows as 718013.7, as the tutorial prints it."""
    # numpy formats float32 with the shortest digits that round-trip (Dragon4, unique=True).
    return np.asarray(values, dtype=np.float32).astype(np.str_).astype(np.float64)


# --- into Arrow --------------------------------------------------------------------------------


def tensor_array(values: Sequence[Any], column: str) -> pa.Array:
    """Builds a float32 tensor column from per-row sequences of numbers:
    ``fixed_size_list<float32>[N]`` when every row has width N, else ``list<float32>``."""
    rows = list(values)
    if rows and all(r is not None for r in rows):
        try:
            flat = np.asarray(rows, dtype=np.float32)
        except ValueError:
            flat = None  # ragged rows: variable-size lists below
        if flat is not None and flat.ndim == 2:
            return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    try:
        return pa.array(
            [None if r is None else np.asarray(r, dtype=np.float32).reshape(-1) for r in rows],
            type=pa.list_(pa.float32()),
        )
    except (ValueError, TypeError, pa.ArrowException) as err:
        raise InvalidInputError(
            f"column {column!r}: rows must be lists of numbers ({err})"
        ) from None


def _is_list_like(value: object) -> bool:
    return isinstance(value, list | tuple | np.ndarray)


def _first_non_null(values: Sequence[Any]) -> object:
    return next((v for v in values if v is not None), None)


def _column_array(name: str, values: Sequence[Any]) -> pa.Array:
    if _is_list_like(_first_non_null(values)):
        try:
            return tensor_array(values, name)
        except InvalidInputError:
            pass  # lists of something else (strings...): let Arrow infer the type
    try:
        return pa.array(values)
    except (pa.ArrowException, TypeError, ValueError) as err:
        raise InvalidInputError(f"column {name!r} cannot be converted to Arrow: {err}") from None


def table_from_pandas(df: pd.DataFrame) -> pa.Table:
    """Converts a DataFrame; columns of number lists become float32 tensor columns."""
    arrays: list[pa.Array | pa.ChunkedArray] = []
    names: list[str] = []
    for name in df.columns:
        series = df[name]
        names.append(str(name))
        if series.dtype == object and _is_list_like(_first_non_null(series.tolist())):
            arrays.append(_column_array(str(name), series.tolist()))
        else:
            try:
                arrays.append(pa.array(series))
            except (pa.ArrowException, TypeError, ValueError) as err:
                raise InvalidInputError(f"column {name!r} cannot be converted: {err}") from None
    return pa.table(arrays, names=names)


def records_to_table(records: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Converts pandas-records JSON (``[{"tensor": [...]}, ...]``) without needing pandas."""
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record))
    return pa.table(
        [_column_array(n, [r.get(n) for r in records]) for n in names], names=list(names)
    )


def _json_to_table(doc: object, path: Path) -> pa.Table:
    if isinstance(doc, list) and all(isinstance(r, dict) for r in doc):
        return records_to_table(doc)
    if isinstance(doc, dict) and all(isinstance(v, dict | list) for v in doc.values()):
        # pandas' "columns" ({col: {index: value}}) and "list" ({col: [values]}) orients.
        columns = {k: list(v.values()) if isinstance(v, dict) else v for k, v in doc.items()}
        return pa.table([_column_array(k, v) for k, v in columns.items()], names=list(columns))
    raise InvalidInputError(f"{path}: expected pandas records JSON, e.g. [{{'tensor': [...]}}]")


def read_table_file(path: str | Path) -> tuple[pa.Table, str]:
    """Reads an inference input file.

    Args:
        path: An Arrow IPC file or stream (``.arrow``, ``.arrows``, ``.ipc``, ``.feather``), or
            pandas records JSON (``.df.json``, ``.json``).

    Returns:
        The table and the file's natural format: ``"arrow"`` or ``"pandas"``.
    """
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"input file not found: {p}")
    if p.suffix.lower() == ".json":
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise InvalidInputError(f"{p}: not valid JSON ({err})") from None
        return _json_to_table(doc, p), "pandas"
    try:
        with pa.memory_map(str(p)) as source:
            try:
                return pyarrow.ipc.open_file(source).read_all(), "arrow"
            except pa.ArrowInvalid:
                source.seek(0)
                return pyarrow.ipc.open_stream(source).read_all(), "arrow"
    except pa.ArrowInvalid as err:
        raise InvalidInputError(
            f"{p}: not an Arrow IPC file or stream ({err}); use .arrow or .df.json"
        ) from None


def to_ipc(table: pa.Table) -> bytes:
    """Serialises a table as one Arrow IPC stream."""
    sink = pa.BufferOutputStream()
    with pyarrow.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def from_ipc(data: bytes) -> pa.Table:
    """Reads an Arrow IPC stream (or file) into a table."""
    buf = pa.py_buffer(data)
    try:
        return pyarrow.ipc.open_stream(buf).read_all()
    except pa.ArrowInvalid:
        return pyarrow.ipc.open_file(buf).read_all()


def write_arrow_file(table: pa.Table, path: str | Path) -> None:
    """Writes a table as an Arrow IPC file (readable by ``read_table_file``)."""
    with pa.OSFile(str(path), "wb") as sink, pyarrow.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def refuse_non_finite(table: pa.Table) -> None:
    """Raises InvalidInputError naming the first NaN or infinite input value, if any."""
    for name, column in zip(table.column_names, table.columns, strict=True):
        values: Any = column.combine_chunks()
        width = 1
        while _is_list(values.type):
            if pa.types.is_fixed_size_list(values.type):
                width *= values.type.list_size
            values = values.flatten()
        if not pa.types.is_floating(values.type) or len(values) == 0:
            continue
        # numpy, not pyarrow.compute: two compute kernels cost more than the whole check.
        present = values.fill_null(0) if values.null_count else values
        finite = np.isfinite(present.to_numpy(zero_copy_only=False))
        if not finite.all():
            first = int(np.argmin(finite))
            row = f"row {first // width}" if width > 1 or len(values) == table.num_rows else ""
            raise InvalidInputError(
                f"column {name!r} has a NaN or infinite value ({row or 'in one of its rows'}): "
                "hotswap refuses them by default, since most models turn them into wrong "
                "answers silently; pass allow_nan=True (CLI: --allow-nan) if your model reads "
                "NaN as 'missing'"
            )


# The files `write_result` writes, by suffix.
RESULT_SUFFIXES = (".csv", ".json", ".arrow", ".parquet")


def check_result_path(path: str | Path) -> str:
    """The suffix of a result file `write_result` can write; else InvalidInputError."""
    suffix = Path(path).suffix.lower()
    if suffix not in RESULT_SUFFIXES:
        raise InvalidInputError(
            f"cannot write results to {str(path)!r}: name a file ending in "
            f"{', '.join(RESULT_SUFFIXES)} (CSV, pandas-records JSON, Arrow IPC file, Parquet)"
        )
    return suffix


def write_result(table: pa.Table, path: str | Path) -> None:
    """Writes an inference result, every value kept, in the format `path`'s suffix names:
    CSV (list values as JSON arrays), JSON (pandas records), Arrow IPC file or Parquet."""
    suffix = check_result_path(path)
    if suffix == ".arrow":
        write_arrow_file(table, path)
    elif suffix == ".parquet":
        from pyarrow import parquet

        parquet.write_table(table, str(path))
    elif suffix == ".json":
        Path(path).write_text(json.dumps(table_to_records(table), default=str) + "\n")
    else:
        from pyarrow import csv

        flat = {
            name: pa.array([json.dumps(v) for v in column_to_python(col)], pa.string())
            if _is_list(col.type)
            else col
            for name, col in zip(table.column_names, table.columns, strict=True)
        }
        csv.write_csv(pa.table(flat), str(path))


def _is_list(typ: pa.DataType) -> bool:
    return bool(
        pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)
    )


# --- out of Arrow ------------------------------------------------------------------------------


def _float_list_column(arr: pa.Array) -> list[Any] | None:
    """Python lists per row for a list column of floats (shortest float32 display), else None."""
    typ = arr.type
    if not (
        pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)
    ):
        return None
    if not pa.types.is_floating(typ.value_type):
        return None
    is_f32 = pa.types.is_float32(typ.value_type)
    if arr.null_count:
        return [_float_row(r, is_f32) for r in arr.to_pylist()]
    values = arr.flatten().to_numpy(zero_copy_only=False)
    if is_f32:
        values = shortest_float32(values)
    if pa.types.is_fixed_size_list(typ):
        return list(values.reshape(len(arr), typ.list_size).tolist())
    offsets = np.asarray(arr.offsets) - arr.offsets[0].as_py()
    return [part.tolist() for part in np.split(values, offsets[1:-1])]


def _float_row(row: list[float | None] | None, is_f32: bool) -> list[float | None] | None:
    if row is None or not is_f32:
        return row
    return [None if v is None else float(shortest_float32(v)) for v in row]


def column_to_python(col: pa.ChunkedArray | pa.Array) -> list[Any]:
    """A column as Python values, float32 shown the shortest way and timestamps as datetimes."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    rows = _float_list_column(arr)
    if rows is not None:
        return rows
    if pa.types.is_float32(arr.type):
        out: list[Any] = shortest_float32(arr.to_numpy(zero_copy_only=False)).tolist()
        if arr.null_count:
            valid = arr.is_valid().to_pylist()
            out = [v if ok else None for v, ok in zip(out, valid, strict=True)]
        return out
    return list(arr.to_pylist())


def table_to_pandas(table: pa.Table) -> pd.DataFrame:
    """Converts an inference result to pandas: list columns become Python lists per row (float32
    shown the shortest way), other columns keep their dtypes."""
    pandas = require_pandas()
    data: dict[str, Any] = {}
    for name, col in zip(table.column_names, table.columns, strict=True):
        arr = col.combine_chunks()
        rows = _float_list_column(arr)
        if rows is not None:
            data[name] = pandas.Series(rows, dtype=object)
        else:
            data[name] = col.to_pandas()
    return cast("pd.DataFrame", pandas.DataFrame(data, columns=table.column_names))


def table_to_records(table: pa.Table) -> list[dict[str, Any]]:
    """JSON-ready records: timestamps as ISO 8601 strings, float32 shown the shortest way."""
    columns = [column_to_python(c) for c in table.columns]
    for values in columns:
        for i, v in enumerate(values):
            if isinstance(v, datetime):
                values[i] = v.isoformat()
    return [dict(zip(table.column_names, row, strict=True)) for row in zip(*columns, strict=True)]
