"""Arrow <-> numpy conversion on the request path (no ONNX Runtime involved)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as npst

from hotswap.engine.arrow_io import (
    InputReader,
    cast_values,
    column_to_ndarray,
    decode_ipc,
    encode_ipc,
    int32_zeros,
    ndarray_to_arrow,
    timestamp_column,
)
from hotswap.engine.errors import InvalidInput


def _file_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def _fsl(rows: list[list[float]], width: int) -> pa.Array:
    return pa.array(rows, type=pa.list_(pa.float32(), width))


# --- IPC ------------------------------------------------------------------------------------


def test_decode_the_tutorial_file(assets: Path) -> None:
    data = (assets / "data" / "xtest-1k.arrow").read_bytes()
    table = decode_ipc(data)
    assert table.num_rows == 1000
    assert table.schema.field("tensor").type == pa.list_(pa.float32(), 18)


def test_encode_writes_a_stream_that_decodes_back() -> None:
    table = pa.table({"tensor": _fsl([[1, 2], [3, 4]], 2)}).replace_schema_metadata({b"k": b"v"})
    data = encode_ipc(table)
    assert data[:4] == b"\xff\xff\xff\xff"  # stream continuation marker, not the file magic
    back = decode_ipc(data)
    assert pa.Table.from_batches([back]).equals(table, check_metadata=True)
    assert pa.Table.from_batches([decode_ipc(_file_bytes(table))]).equals(
        table, check_metadata=True
    )


def test_decode_multi_batch_stream_keeps_every_row() -> None:
    sink = pa.BufferOutputStream()
    schema = pa.schema([("x", pa.float64())])
    with ipc.new_stream(sink, schema) as writer:
        writer.write_batch(pa.record_batch([pa.array([1.0, 2.0])], schema=schema))
        writer.write_batch(pa.record_batch([pa.array([3.0])], schema=schema))
    table = decode_ipc(sink.getvalue().to_pybytes())
    assert table.column("x").to_pylist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "request body is empty"),
        (b"definitely not arrow", "not a valid Arrow IPC stream or file"),
        (b"ARROW1\x00\x00garbage", "not a valid Arrow IPC stream or file"),
    ],
)
def test_decode_rejects_junk(data: bytes, expected: str) -> None:
    with pytest.raises(InvalidInput, match=expected):
        decode_ipc(data)


def test_decode_rejects_a_truncated_stream() -> None:
    data = encode_ipc(pa.table({"x": pa.array(np.arange(100, dtype=np.float64))}))
    with pytest.raises(InvalidInput, match="not a valid Arrow IPC"):
        decode_ipc(data[: len(data) // 2])


def test_decode_validates_list_offsets_in_full() -> None:
    column = pa.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], type=pa.list_(pa.float32()))
    data = encode_ipc(pa.table({"tensor": column}))
    good = np.array([0, 2, 4, 6], dtype="<i4").tobytes()
    assert data.count(good) == 1
    # A middle offset far beyond the values: only a full validation notices it, and reading
    # the column without one would touch memory outside the message.
    bad = data.replace(good, np.array([0, 1000, 4, 6], dtype="<i4").tobytes())
    with pytest.raises(InvalidInput, match="not a valid Arrow IPC"):
        decode_ipc(bad)


@st.composite
def float_tables(draw: st.DrawFn) -> pa.Table:
    rows = draw(st.integers(0, 20))
    columns: dict[str, pa.Array] = {}
    for i in range(draw(st.integers(1, 3))):
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        width = draw(st.integers(0, 4))
        floats = st.floats(width=32 if dtype is np.float32 else 64, allow_nan=False)
        values = draw(npst.arrays(dtype, rows * max(width, 1), elements=floats))
        if width == 0:  # a plain column, possibly with nulls
            mask = draw(npst.arrays(np.bool_, rows))
            columns[f"c{i}"] = pa.array(values, mask=mask)
        else:
            columns[f"c{i}"] = pa.FixedSizeListArray.from_arrays(pa.array(values), width)
    return pa.table(columns).replace_schema_metadata({b"hotswap.pipeline": b"p"})


@settings(max_examples=30, deadline=None)
@given(table=float_tables(), file_format=st.booleans())
def test_ipc_round_trip(table: pa.Table, file_format: bool) -> None:
    data = _file_bytes(table) if file_format else encode_ipc(table)
    back = decode_ipc(data)
    assert pa.Table.from_batches([back]).equals(table, check_metadata=True)
    assert pa.Table.from_batches([decode_ipc(encode_ipc(back))]).equals(table, check_metadata=True)


# --- columns to tensors ---------------------------------------------------------------------


def test_fixed_size_list_float32_is_zero_copy() -> None:
    column = _fsl([[1, 2, 3], [4, 5, 6]], 3)
    values, shape = column_to_ndarray(pa.chunked_array([column]), "tensor")
    assert shape == (3,)
    assert values.dtype == np.float32
    assert values.tolist() == [1, 2, 3, 4, 5, 6]
    backing = np.frombuffer(column.values.buffers()[1], dtype=np.float32)
    assert np.shares_memory(values, backing)


def test_sliced_fixed_size_list_reads_only_its_rows() -> None:
    column = _fsl([[1, 2], [3, 4], [5, 6], [7, 8]], 2).slice(1, 2)
    values, shape = column_to_ndarray(column, "tensor")
    assert (values.tolist(), shape) == ([3, 4, 5, 6], (2,))


@pytest.mark.parametrize("list_type", [pa.list_, pa.large_list])
def test_sliced_variable_lists_read_only_their_rows(list_type: Callable[..., Any]) -> None:
    column = pa.array([[1, 2], [3, 4], [5, 6], [7, 8]], type=list_type(pa.float64()))
    values, shape = column_to_ndarray(column.slice(1, 2), "tensor")
    assert (values.tolist(), shape) == ([3, 4, 5, 6], (2,))
    assert values.dtype == np.float64


def test_nested_lists_give_a_row_shape() -> None:
    column = pa.array([[[1, 2, 3], [4, 5, 6]]] * 2, type=pa.list_(pa.list_(pa.float32(), 3)))
    values, shape = column_to_ndarray(column, "tensor")
    assert shape == (2, 3)
    assert values.reshape(2, 2, 3)[1, 1].tolist() == [4, 5, 6]


def test_several_chunks_are_joined() -> None:
    column = pa.chunked_array([_fsl([[1, 2]], 2), _fsl([[3, 4], [5, 6]], 2)])
    values, shape = column_to_ndarray(column, "tensor")
    assert (values.tolist(), shape) == ([1, 2, 3, 4, 5, 6], (2,))


def test_plain_numeric_and_bool_columns() -> None:
    values, shape = column_to_ndarray(pa.array([1, 2, 3], type=pa.int32()), "x")
    assert (values.tolist(), shape) == ([1, 2, 3], ())
    assert values.dtype == np.int32
    values, shape = column_to_ndarray(pa.array([True, False, True]).slice(1), "x")
    assert (values.tolist(), shape) == ([False, True], ())


def test_fixed_shape_tensor_extension_reads_its_storage() -> None:
    tensor_type = pa.fixed_shape_tensor(pa.float32(), [2, 3])
    storage = _fsl([[1, 2, 3, 4, 5, 6]], 6)
    column = pa.ExtensionArray.from_storage(tensor_type, storage)
    values, shape = column_to_ndarray(column, "tensor")
    assert (values.tolist(), shape) == ([1, 2, 3, 4, 5, 6], (6,))


@pytest.mark.parametrize(
    "column",
    [
        pa.array([], type=pa.list_(pa.float32())),
        pa.array([], type=pa.list_(pa.float32(), 3)),
        pa.array([[], []], type=pa.list_(pa.list_(pa.float32()))),
    ],
)
def test_empty_columns_and_rows(column: pa.Array) -> None:
    values, _ = column_to_ndarray(column, "tensor")
    assert values.size == 0


def test_nulls_outside_a_slice_do_not_count() -> None:
    column = pa.array([[1.0, 2.0], None, [3.0, 4.0]], type=pa.list_(pa.float64()))
    values, _ = column_to_ndarray(column.slice(2), "tensor")
    assert values.tolist() == [3.0, 4.0]


@pytest.mark.parametrize(
    ("column", "message"),
    [
        (pa.array([[1.0, 2.0], None], type=pa.list_(pa.float32(), 2)), "contains nulls"),
        (pa.array([[1.0, None]], type=pa.list_(pa.float32())), "contains nulls"),
        (pa.array([1.0, None]), "contains nulls"),
        (pa.array([[1.0, 2.0], [3.0]]), r"rows of different lengths \(2 and 1 values\)"),
        (pa.array(["a", "b"]), "holds string values: send numbers"),
        (pa.array([["a"]]), "holds string values inside its lists"),
        (pa.array([{"a": 1.0}]), "holds struct"),
    ],
)
def test_unusable_columns_are_refused(column: pa.Array, message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as caught:
        column_to_ndarray(column, "tensor")
    assert "'tensor'" in str(caught.value)


# --- casting --------------------------------------------------------------------------------


def test_cast_keeps_same_dtype_without_copy() -> None:
    values = np.arange(4, dtype=np.float32)
    assert cast_values(values, np.dtype(np.float32), "x") is values


def test_cast_float64_to_float32_and_whole_floats_to_int() -> None:
    out = cast_values(np.array([1.5, 1e300]), np.dtype(np.float32), "x")
    assert out.dtype == np.float32
    assert out[0] == 1.5
    assert np.isinf(out[1])
    assert cast_values(np.array([3.0, -2.0]), np.dtype(np.int64), "x").tolist() == [3, -2]


@pytest.mark.parametrize(
    ("values", "dtype", "message"),
    [
        (np.array([1.5]), np.int64, "not all whole numbers"),
        (np.array([np.nan]), np.int64, "not all whole numbers"),
        (np.array([2**40], dtype=np.int64), np.int32, "outside"),
        (np.array([-1], dtype=np.int64), np.uint8, "outside"),
    ],
)
def test_cast_refuses_to_change_values(values: np.ndarray, dtype: type, message: str) -> None:
    with pytest.raises(InvalidInput, match=f"model 'm' takes {np.dtype(dtype)} but .*{message}"):
        cast_values(values, np.dtype(dtype), "model 'm'")


# --- tensors to columns ---------------------------------------------------------------------


def test_one_dim_output_is_a_plain_column() -> None:
    values = np.array([1.0, 2.0], dtype=np.float32)
    array = ndarray_to_arrow(values)
    assert array.type == pa.float32()
    assert array.to_pylist() == [1.0, 2.0]


def test_two_dim_output_is_a_list_per_row_without_copying() -> None:
    values = np.arange(6, dtype=np.float32).reshape(3, 2)
    array = ndarray_to_arrow(values)
    assert array.type == pa.list_(pa.float32())
    assert array.to_pylist() == [[0, 1], [2, 3], [4, 5]]
    assert np.shares_memory(np.frombuffer(array.values.buffers()[1], np.float32), values)


def test_higher_rank_output_nests_lists() -> None:
    values = np.arange(12, dtype=np.int64).reshape(2, 2, 3)
    array = ndarray_to_arrow(values)
    assert array.type == pa.list_(pa.list_(pa.int64()))
    assert array.to_pylist() == values.tolist()


def test_bool_string_and_empty_width_outputs() -> None:
    assert ndarray_to_arrow(np.array([[True], [False]])).to_pylist() == [[True], [False]]
    strings = np.array([["a"], ["b"]], dtype=object)
    assert ndarray_to_arrow(strings).to_pylist() == [["a"], ["b"]]
    assert ndarray_to_arrow(np.zeros((2, 0), np.float32)).to_pylist() == [[], []]


def test_strided_output_is_copied_into_place() -> None:
    values = np.arange(10, dtype=np.float64)[::2]
    assert ndarray_to_arrow(values).to_pylist() == [0, 2, 4, 6, 8]
    columns = np.arange(6, dtype=np.float32).reshape(2, 3).T  # Fortran-ordered [3, 2]
    assert ndarray_to_arrow(columns).to_pylist() == [[0, 3], [1, 4], [2, 5]]


def test_large_batches_compute_offsets_beyond_the_cache() -> None:
    values = np.arange(5000 * 2, dtype=np.float32).reshape(5000, 2)
    array = ndarray_to_arrow(values)
    assert len(array) == 5000
    assert array[4999].as_py() == [9998.0, 9999.0]
    assert int32_zeros(5000).to_numpy().sum() == 0


def test_time_and_check_failure_columns() -> None:
    times = timestamp_column(1_700_000_000_123, 3)
    assert times.type == pa.timestamp("ms")
    assert times.cast(pa.int64()).to_pylist() == [1_700_000_000_123] * 3
    zeros = int32_zeros(2)
    assert (zeros.type, zeros.to_pylist()) == (pa.int32(), [0, 0])


# --- reading one model input ----------------------------------------------------------------


def _reader(row: tuple[int | None, ...] | None, batch: int | None = None) -> InputReader:
    return InputReader(("tensor", "x"), "x", np.dtype(np.float32), batch, row, "model 'm'")


def test_reader_accepts_the_onnx_name_and_reshapes_to_the_model() -> None:
    table = pa.table({"x": pa.array([[1.0] * 6] * 2, type=pa.list_(pa.float64()))})
    tensor = _reader((2, 3)).tensor(table, 2)
    assert tensor.shape == (2, 2, 3)
    assert tensor.dtype == np.float32


@pytest.mark.parametrize(
    ("row", "shape"), [(None, (2, 4)), ((None,), (2, 4)), ((4,), (2, 4)), ((None, 4), (2, 1, 4))]
)
def test_reader_with_dynamic_dims(row: tuple[int | None, ...] | None, shape: tuple[int]) -> None:
    column = [[[1.0, 2.0, 3.0, 4.0]]] * 2 if len(shape) == 3 else [[1.0, 2.0, 3.0, 4.0]] * 2
    table = pa.table({"tensor": column})
    assert _reader(row).tensor(table, 2).shape == shape


def test_reader_messages() -> None:
    table = pa.table({"tensor": _fsl([[1.0, 2.0]], 2)})
    with pytest.raises(
        InvalidInput, match="column 'tensor' has 2 values per row; model 'm' expects 3"
    ):
        _reader((3,)).tensor(table, 1)
    with pytest.raises(InvalidInput, match=r"rows shaped \[2\]; model 'm' expects \[\?, 5\]"):
        _reader((None, 5)).tensor(table, 1)
    with pytest.raises(InvalidInput, match="takes exactly 4 row"):
        _reader((2,), batch=4).tensor(table, 1)
    with pytest.raises(InvalidInput, match=r"no column 'tensor' or 'x' .* columns sent: \['y'\]"):
        _reader((2,)).tensor(pa.table({"y": [1.0]}), 1)
    twice = pa.Table.from_arrays([pa.array([1.0]), pa.array([2.0])], names=["x", "x"])
    with pytest.raises(InvalidInput, match="column 'x' appears 2 times"):
        _reader(()).tensor(twice, 1)
