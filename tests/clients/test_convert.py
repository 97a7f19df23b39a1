"""Conversions between pandas / Arrow / files and Arrow IPC, and the float display rule."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.ipc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotswap.clients._convert import (
    column_to_python,
    from_ipc,
    read_table_file,
    records_to_table,
    shortest_float32,
    table_from_pandas,
    table_to_pandas,
    table_to_records,
    to_ipc,
    write_arrow_file,
)
from hotswap.clients._errors import InvalidInputError

HOUSE = [4.0, 2.5, 2900.0, 5505.0, 2.0, 0.0, 0.0, 3.0, 8.0, 2900.0, 0.0, 47.6063, -122.02, 2970.0,
         5251.0, 12.0, 0.0, 0.0]  # fmt: skip


def test_float32_shows_the_shortest_way_that_round_trips() -> None:
    assert float(np.float32(718013.6875)) == 718013.6875
    assert shortest_float32([718013.6875]).tolist() == [718013.7]
    assert repr(shortest_float32(np.float32(718013.6875)).item()) == "718013.7"


@given(st.floats(width=32, allow_nan=False))
def test_shortest_float32_round_trips_to_the_same_float32(x: float) -> None:
    shown = shortest_float32([x]).item()
    assert np.float32(shown) == np.float32(x)
    assert len(repr(shown)) <= len(repr(float(np.float32(x))))


def test_shortest_float32_keeps_nan_and_infinities() -> None:
    out = shortest_float32([np.nan, np.inf, -np.inf])
    assert np.isnan(out[0])
    assert out[1:].tolist() == [np.inf, -np.inf]


def test_pandas_tensor_lists_become_fixed_size_float32() -> None:
    df = pd.DataFrame({"tensor": [HOUSE, HOUSE]})
    table = table_from_pandas(df)
    assert table.schema.field("tensor").type == pa.list_(pa.float32(), 18)
    assert table.num_rows == 2


def test_ragged_tensor_lists_become_variable_float32_lists() -> None:
    table = table_from_pandas(pd.DataFrame({"tensor": [[1.0, 2.0], [3.0]]}))
    assert table.schema.field("tensor").type == pa.list_(pa.float32())
    assert column_to_python(table["tensor"]) == [[1.0, 2.0], [3.0]]


def test_numpy_rows_and_int_lists_are_accepted() -> None:
    df = pd.DataFrame({"tensor": [np.arange(3), np.arange(3)], "id": [1, 2]})
    table = table_from_pandas(df)
    assert table.schema.field("tensor").type == pa.list_(pa.float32(), 3)
    assert table.schema.field("id").type == pa.int64()


def test_non_numeric_lists_keep_their_arrow_type() -> None:
    table = table_from_pandas(pd.DataFrame({"tags": [["a", "b"], ["c"]]}))
    assert table.schema.field("tags").type == pa.list_(pa.string())


def test_result_to_pandas_keeps_columns_order_and_dtypes() -> None:
    result = pa.table(
        {
            "time": pa.array([1_700_000_000_000, 1_700_000_000_001], pa.timestamp("ms")),
            "in.tensor": pa.FixedSizeListArray.from_arrays(pa.array(HOUSE * 2, pa.float32()), 18),
            "in.id": pa.array([7, 8], pa.int64()),
            "out.variable": pa.FixedSizeListArray.from_arrays(
                pa.array([718013.6875, 310919.9375], pa.float32()), 1
            ),
            "check_failures": pa.array([0, 0], pa.int32()),
        }
    )
    df = table_to_pandas(result)
    assert list(df.columns) == result.column_names
    assert df.loc[0, "out.variable"] == [718013.7]
    assert df.loc[0, "in.tensor"] == HOUSE
    assert str(df["time"].dtype) == "datetime64[ms]"
    assert df["in.id"].dtype == np.int64
    assert df["check_failures"].dtype == np.int32


def test_variable_lists_and_nulls_to_python() -> None:
    arr = pa.array([[1.5, 2.25], None, [718013.6875]], pa.list_(pa.float32()))
    assert column_to_python(arr) == [[1.5, 2.25], None, [718013.7]]
    sliced = pa.array([[1.0], [2.0, 3.0], [4.0]], pa.list_(pa.float32())).slice(1)
    assert column_to_python(sliced) == [[2.0, 3.0], [4.0]]
    scalars = pa.array([0.1, None], pa.float32())
    assert column_to_python(scalars) == [0.1, None]


def test_records_are_json_ready() -> None:
    table = pa.table(
        {
            "time": pa.array([0], pa.timestamp("ms")),
            "out.variable": pa.array([[718013.6875]], pa.list_(pa.float32())),
        }
    )
    records = table_to_records(table)
    assert records == [{"time": datetime(1970, 1, 1).isoformat(), "out.variable": [718013.7]}]
    json.dumps(records)


def test_records_json_without_pandas() -> None:
    table = records_to_table([{"tensor": HOUSE, "id": 1}, {"tensor": HOUSE, "id": 2}])
    assert table.column_names == ["tensor", "id"]
    assert table.schema.field("tensor").type == pa.list_(pa.float32(), 18)


def test_read_df_json_records_and_columns_orients(tmp_path: Path) -> None:
    records = tmp_path / "in.df.json"
    records.write_text(json.dumps([{"tensor": HOUSE}]))
    table, fmt = read_table_file(records)
    assert fmt == "pandas"
    assert column_to_python(table["tensor"]) == [HOUSE]
    columns = tmp_path / "columns.json"
    pd.DataFrame({"tensor": [HOUSE]}).to_json(columns)
    assert read_table_file(columns)[0].equals(table)


def test_read_arrow_file_and_stream(tmp_path: Path) -> None:
    table = pa.table(
        {"tensor": pa.FixedSizeListArray.from_arrays(pa.array(HOUSE, pa.float32()), 18)}
    )
    as_file = tmp_path / "a.arrow"
    write_arrow_file(table, as_file)
    as_stream = tmp_path / "b.arrow"
    as_stream.write_bytes(to_ipc(table))
    assert read_table_file(as_file) == (table, "arrow")
    assert read_table_file(as_stream)[0].equals(table)


def test_read_errors_are_typed(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="not found"):
        read_table_file(tmp_path / "missing.arrow")
    bad = tmp_path / "bad.arrow"
    bad.write_bytes(b"not arrow")
    with pytest.raises(InvalidInputError, match="not an Arrow IPC"):
        read_table_file(bad)
    bad_json = tmp_path / "bad.df.json"
    bad_json.write_text("{")
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        read_table_file(bad_json)


def test_shared_assets_read_as_the_tutorial_shape(assets: Path) -> None:
    one, _ = read_table_file(assets / "data" / "xtest-1.df.json")
    k, _ = read_table_file(assets / "data" / "xtest-1k.arrow")
    assert one.schema.field("tensor").type == pa.list_(pa.float32(), 18)
    assert k.num_rows == 1000
    assert k.schema.field("tensor").type == pa.list_(pa.float32(), 18)


def test_ipc_file_bytes_are_read_too() -> None:
    table = pa.table({"x": [1, 2]})
    sink = pa.BufferOutputStream()
    with pyarrow.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    assert from_ipc(sink.getvalue().to_pybytes()).equals(table)


@settings(max_examples=50, deadline=None)
@given(
    rows=st.lists(st.lists(st.floats(width=32, allow_nan=False), min_size=3, max_size=3),
                  min_size=1, max_size=20),
    ids=st.integers(min_value=-(2**62), max_value=2**62),
)  # fmt: skip
def test_pandas_arrow_ipc_round_trip(rows: list[list[float]], ids: int) -> None:
    df = pd.DataFrame({"id": [ids] * len(rows), "tensor": rows})
    table = from_ipc(to_ipc(table_from_pandas(df)))
    back = table_to_pandas(table)
    assert list(back.columns) == ["id", "tensor"]
    assert back["id"].dtype == np.int64
    assert [[np.float32(v) for v in r] for r in back["tensor"]] == [
        [np.float32(v) for v in r] for r in rows
    ]
