"""Request bodies: rows from an .arrow / .df.json file or generated, cut to `--batch-rows`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa


def tensor_table(x: npt.NDArray[np.float32]) -> pa.Table:
    flat = pa.array(np.ascontiguousarray(x, dtype=np.float32).ravel())
    return pa.table({"tensor": pa.FixedSizeListArray.from_arrays(flat, x.shape[1])})


def generated(width: int, rows: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return tensor_table(rng.standard_normal((rows, width)).astype(np.float32))


def read_table(path: Path) -> pa.Table:
    if path.name.endswith(".df.json"):
        records = json.loads(path.read_text())
        if isinstance(records, dict):  # pandas "columns" orient: {"tensor": {"0": [...]}}
            records = [{"tensor": v} for v in records["tensor"].values()]
        x = np.asarray([np.ravel(r["tensor"]) for r in records], dtype=np.float32)
        return tensor_table(x)
    with path.open("rb") as f:
        magic = f.read(6)
    # An Arrow IPC file starts with "ARROW1"; anything else is read as a stream.
    if magic == b"ARROW1":
        return pa.ipc.open_file(path).read_all()
    return pa.ipc.open_stream(path.read_bytes()).read_all()


def batch(table: pa.Table, rows: int | None) -> pa.Table:
    """The first `rows` rows, repeating the table when it is shorter."""
    if rows is None or rows == table.num_rows:
        return table.combine_chunks()
    if table.num_rows == 0:
        raise ValueError("input has no rows")
    repeats = -(-rows // table.num_rows)
    return pa.concat_tables([table] * repeats).slice(0, rows).combine_chunks()


def ipc_stream(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def raw_tensor(table: pa.Table) -> bytes:
    """The `tensor` column as C-order float32 bytes: what the bare reference server takes."""
    column = table.column("tensor").combine_chunks()
    return np.asarray(column.flatten().to_numpy(zero_copy_only=False), np.float32).tobytes()
