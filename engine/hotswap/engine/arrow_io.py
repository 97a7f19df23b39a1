"""Arrow <-> numpy conversion for the request path: IPC decoding/encoding, input columns to
tensors, output tensors to columns.

Everything here runs once per request, so it avoids per-row Python work and copies wherever
pyarrow and numpy allow: a `fixed_size_list<float32>` column reaches ONNX Runtime as a read-only
view of the request's own buffer, and output tensors become Arrow arrays without a copy.
"""

from __future__ import annotations

import functools
import math
import struct
import threading
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, overload

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.ipc as ipc

from hotswap.engine.errors import InvalidInput, RequestTooLarge

__all__ = [
    "Dims",
    "InputReader",
    "array_of",
    "as_batch",
    "cast_values",
    "column_to_ndarray",
    "decode_ipc",
    "encode_ipc",
    "format_dims",
    "int32_zeros",
    "ndarray_to_arrow",
    "schema_message",
    "tensor_to_arrow",
    "timestamp_column",
]

Array = npt.NDArray[Any]
Dims = tuple[int | None, ...]
"""A tensor's dims as far as the model declares them: None where a dim is dynamic."""

_FILE_MAGIC = b"ARROW1"
_TIMESTAMP_MS = pa.timestamp("ms")
_INT32_MAX = 2**31 - 1
# Requests of up to this many rows reuse cached offsets/zeros arrays (immutable, so shared
# safely across threads); larger ones are rare and big enough that allocating is noise.
_CACHED_ROWS = 4096
# Passing options explicitly skips pyarrow's per-call environment look-ups (~3 us a call).
_READ_OPTIONS = ipc.IpcReadOptions()
_WRITE_OPTIONS = ipc.IpcWriteOptions()
# An IPC stream ends with a continuation marker and a zero length.
_END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"
_SCHEMA_KEY_MAX = 4096
# Numeric dtypes whose numpy buffer is exactly an Arrow data buffer (bool is bit-packed in
# Arrow, strings are objects: those go through pa.array).
_PLAIN_NAMES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8")
_PLAIN_TYPES: dict[np.dtype[Any], pa.DataType] = {
    np.dtype(name): pa.from_numpy_dtype(np.dtype(name))
    for name in (*_PLAIN_NAMES, "uint16", "uint32", "uint64")
}


_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")
_D = TypeVar("_D")


class BoundedCache(Generic[_K, _V]):
    """At most `size` entries, the oldest dropped first. Look-ups take no lock (a dict read
    is atomic); additions take one, since executor threads add at once."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: dict[_K, _V] = {}
        self._lock = threading.Lock()

    @overload
    def get(self, key: _K) -> _V | None: ...
    @overload
    def get(self, key: _K, default: _D) -> _V | _D: ...
    def get(self, key: _K, default: object = None) -> object:
        return self._entries.get(key, default)

    def put(self, key: _K, value: _V) -> None:
        with self._lock:
            if len(self._entries) >= self._size and key not in self._entries:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = value


# Parsed request schemas by their metadata bytes (see `_schema_of`).
_SCHEMAS: BoundedCache[bytes, pa.Schema] = BoundedCache(64)


def decode_ipc(data: bytes, max_rows: int = 2**62) -> pa.RecordBatch:
    """Read the rows of Arrow IPC bytes, stream or file format (told apart by the file magic),
    as one record batch.

    A file is read as the stream it holds (its footer is not trusted). In one pass over the
    messages, each batch's flatbuffer metadata is checked before its body is read: more than
    `max_rows` rows, compressed bodies (their decompressed size is the sender's choice) and
    array lengths the body cannot hold are refused. Then the buffers are validated in full:
    offsets in a hostile list column could otherwise point outside the message and crash the
    process when read.

    Raises:
        InvalidInput: the bytes are empty, compressed, or not a valid Arrow IPC stream or file.
        RequestTooLarge: more than `max_rows` rows.
    """
    if not data:
        raise InvalidInput("the request body is empty: send a table as an Arrow IPC stream or file")
    buffer = pa.py_buffer(data)
    # A file is read as the stream it holds after its magic, the very messages checked here:
    # its footer could point at other bytes (a compressed or bigger batch).
    stream = buffer.slice(8) if data[:6] == _FILE_MAGIC else buffer
    try:
        return _read_checked(stream, len(data), max_rows)
    except (pa.ArrowException, struct.error, ValueError, OSError) as exc:
        raise InvalidInput(
            f"the request body is not a valid Arrow IPC stream or file ({len(data)} bytes): {exc}"
        ) from None


def _read_checked(stream: pa.Buffer, size: int, max_rows: int) -> pa.RecordBatch:
    reader = ipc.MessageReader.open_stream(stream)
    try:
        first = reader.read_next_message()
    except StopIteration:
        raise InvalidInput("the request's Arrow IPC stream is empty: it holds no schema") from None
    if first.type != "schema":
        raise InvalidInput(f"the request's Arrow IPC starts with a {first.type}, not a schema")
    schema = _schema_of(first)
    batches, rows, dictionaries = [], 0, False
    for message in reader:
        kind = message.type
        if kind not in ("record batch", "dictionary"):
            continue
        length, compressed, longest = _batch_header(
            message.metadata.to_pybytes(), kind == "dictionary"
        )
        if compressed:
            raise InvalidInput(
                "compressed Arrow IPC is not accepted: write it without compression "
                "(pyarrow: IpcWriteOptions(compression=None), the default)"
            )
        if longest > 8 * size + 8:
            raise InvalidInput(
                f"an array in the request claims {longest} elements, more than its "
                f"{size} bytes can hold"
            )
        if kind == "dictionary":
            dictionaries = True
            continue
        rows += length
        if rows <= max_rows and not dictionaries:  # bodies past the limit are never read
            batches.append(ipc.read_record_batch(message, schema))
    if rows > max_rows:
        raise RequestTooLarge(
            f"the request has {rows} rows; this engine takes at most {max_rows} per call "
            "(split it into batches, or raise --max-rows)"
        )
    if dictionaries:  # rare: let the stream reader resolve them (every message is checked)
        table = ipc.open_stream(stream, options=_READ_OPTIONS).read_all()
        batches = table.combine_chunks().to_batches()
    for batch in batches:
        batch.validate(full=True)
    return batches[0] if len(batches) == 1 else as_batch(pa.Table.from_batches(batches, schema))


def as_batch(rows: pa.RecordBatch | pa.Table) -> pa.RecordBatch:
    """The rows as one record batch (a table's chunks combined)."""
    if isinstance(rows, pa.RecordBatch):
        return rows
    table = rows.combine_chunks()
    return pa.RecordBatch.from_arrays(
        [c.chunk(0) if c.num_chunks else pa.array([], c.type) for c in table.columns],
        schema=table.schema,
    )


def _schema_of(message: ipc.Message) -> pa.Schema:
    """The schema a schema message holds: clients send the same one request after request,
    so parsed schemas are kept by their metadata bytes (equal bytes, equal schema)."""
    key = message.metadata.to_pybytes()
    schema = _SCHEMAS.get(key)
    if schema is None:
        schema = ipc.read_schema(message)
        if len(key) <= _SCHEMA_KEY_MAX:  # big ones (custom metadata) would pin memory
            _SCHEMAS.put(key, schema)
    return schema


def _batch_header(meta: bytes, dictionary: bool) -> tuple[int, bool, int]:
    """(rows, compressed, longest array) of a RecordBatch/DictionaryBatch Message flatbuffer
    (Arrow's Message.fbs: Message.header = field 2; RecordBatch.length = 0, .nodes = 1,
    .compression = 3; DictionaryBatch.data = 1)."""
    message = root_table(meta)
    batch = read_offset(meta, message, 2)
    if dictionary:
        batch = read_offset(meta, batch, 1)
    if batch == 0:
        raise struct.error("a batch message without a header")
    rows = read_scalar(meta, batch, 0, "<q")
    compressed = field_position(meta, batch, 3) != 0
    longest = max([rows, *(length for length, _ in read_pairs(meta, batch, 1))])
    if rows < 0 or longest < 0:
        raise struct.error("a negative length")
    return rows, compressed, longest


def root_table(meta: bytes) -> int:
    """Position of the root table of a flatbuffer (an IPC message's metadata)."""
    return int(struct.unpack_from("<I", meta, 0)[0])


def field_position(meta: bytes, table: int, index: int) -> int:
    """Absolute position of field `index` of the flatbuffer table at `table`; 0 if absent."""
    vtable = table - struct.unpack_from("<i", meta, table)[0]
    (vtable_size,) = struct.unpack_from("<H", meta, vtable)
    slot = 4 + 2 * index
    if slot + 2 > vtable_size:
        return 0
    (offset,) = struct.unpack_from("<H", meta, vtable + slot)
    return table + offset if offset else 0


def read_offset(meta: bytes, table: int, index: int) -> int:
    """Position of what field `index` (a table or vector) points at; 0 if absent."""
    at = field_position(meta, table, index)
    return at + struct.unpack_from("<I", meta, at)[0] if at else 0


def read_scalar(meta: bytes, table: int, index: int, fmt: str) -> int:
    """Scalar field `index` (`fmt` as struct writes it); 0 (the default) if absent."""
    at = field_position(meta, table, index)
    return int(struct.unpack_from(fmt, meta, at)[0]) if at else 0


def read_pairs(meta: bytes, table: int, index: int) -> list[tuple[int, int]]:
    """Field `index`, a vector of structs of two int64 (FieldNode, Buffer); [] if absent."""
    at = read_offset(meta, table, index)
    if at == 0:
        return []
    (count,) = struct.unpack_from("<I", meta, at)
    if at + 4 + 16 * count > len(meta):
        raise struct.error("a vector longer than its message")
    return list(struct.iter_unpack("<qq", meta[at + 4 : at + 4 + 16 * count]))


def encode_ipc(rows: pa.RecordBatch | pa.Table, schema_message: bytes = b"") -> bytes:
    """Write rows as an Arrow IPC stream (schema metadata included). `schema_message` is
    `schema_message(rows.schema)` when the caller has it already: then a one-batch answer is
    that, the batch's message and the end-of-stream marker, with no stream writer."""
    if isinstance(rows, pa.RecordBatch) and schema_message:
        return b"".join((schema_message, rows.serialize().to_pybytes(), _END_OF_STREAM))
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, rows.schema, options=_WRITE_OPTIONS) as writer:
        writer.write(rows)
    return bytes(sink.getvalue().to_pybytes())


def schema_message(schema: pa.Schema) -> bytes:
    """The encapsulated IPC message that starts a stream of `schema`."""
    return bytes(schema.serialize().to_pybytes())


@dataclass(frozen=True, slots=True)
class InputReader:
    """Reads one ONNX input of a pipeline's first step from the request table.

    Finds the column, converts it (`column_to_ndarray`), checks the row shape against the
    model's declared dims and casts to the model's element type.
    """

    columns: tuple[str, ...]  # accepted column names, preferred first
    input_name: str
    dtype: np.dtype[Any]
    batch: int | None  # a batch size the model fixes, if any
    row: Dims | None  # per-row dims after the batch axis; None = rank unknown
    what: str  # how messages name this input, e.g. "model 'housing-rf'"
    static_row: tuple[int, ...] | None = field(init=False)
    size: int | None = field(init=False)  # values per row, when `row` is fully static

    def __post_init__(self) -> None:
        static = None
        if self.row is not None and all(d is not None for d in self.row):
            static = tuple(int(d) for d in self.row if d is not None)
        object.__setattr__(self, "static_row", static)
        object.__setattr__(self, "size", None if static is None else math.prod(static))

    def tensor(self, table: pa.RecordBatch, rows: int) -> Array:
        """This input's tensor for `table` (which has `rows > 0` rows).

        Raises:
            InvalidInput: the column is missing or cannot become this input (see
                `column_to_ndarray` and `cast_values`), or has the wrong values per row.
        """
        schema = table.schema
        for column in self.columns:
            index = schema.get_field_index(column)  # -1 when missing or duplicated
            if index >= 0:
                break
        else:
            raise self._missing(table)
        values, shape = column_to_ndarray(table.column(index), column)
        return self._shaped(values, shape, rows, column)

    def array(self, values: Array, column: str) -> Array:
        """This input's tensor from an array shaped `[rows, *row]` (what the Open Inference
        Protocol sends), with the same checks as `tensor`."""
        return self._shaped(values.reshape(-1), values.shape[1:], values.shape[0], column)

    def _shaped(self, values: Array, shape: tuple[int, ...], rows: int, column: str) -> Array:
        if self.static_row is not None:
            if math.prod(shape) != self.size:
                raise InvalidInput(
                    f"column {column!r} has {math.prod(shape)} values per row; "
                    f"{self.what} expects {self.size}"
                )
            target = (rows, *self.static_row)
        else:
            target = (rows, *self._dynamic_row(column, shape))
        if self.batch is not None and rows != self.batch:
            raise InvalidInput(
                f"{self.what} takes exactly {self.batch} row(s) per request; got {rows}"
            )
        return cast_values(values.reshape(target), self.dtype, f"{self.what} (column {column!r})")

    def _dynamic_row(self, column: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        row = self.row
        if row is None:
            return shape
        if len(row) == len(shape) and all(
            d is None or d == s for d, s in zip(row, shape, strict=True)
        ):
            return shape
        if len(row) == 1:  # [N, ?]: any width, nested lists flattened row-major
            return (math.prod(shape),)
        raise InvalidInput(
            f"column {column!r} has rows shaped {list(shape)}; {self.what} expects "
            f"{format_dims(row)} per row"
        )

    def _missing(self, table: pa.RecordBatch) -> InvalidInput:
        names = table.column_names
        for column in self.columns:
            if names.count(column) > 1:
                return InvalidInput(f"column {column!r} appears {names.count(column)} times")
        accepted = " or ".join(repr(c) for c in self.columns)
        return InvalidInput(
            f"the table has no column {accepted} ({self.what} reads it); columns sent: {names}"
        )


def format_dims(dims: Dims) -> str:
    """`[18]`, `[?, 3]`: dims as messages show them."""
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def column_to_ndarray(
    column: pa.ChunkedArray | pa.Array, name: str
) -> tuple[Array, tuple[int, ...]]:
    """The values of a numeric or (nested) list-of-numeric column, and the shape of one row.

    Returns `(values, row_shape)`: `values` is flat (all rows concatenated, zero-copy when the
    column is one chunk without nulls); a plain numeric column has `row_shape == ()`, a
    `fixed_size_list<float>[18]` or `list<double>` column of 18-value rows `(18,)`, a list of
    lists `(3, 6)`. Slices are honoured: only the column's own rows are read.

    Raises:
        InvalidInput: nulls anywhere, rows of different lengths, or values that are not numbers.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    array: Any = column
    # Walk down the list levels keeping [start, stop) in the current array's logical indices,
    # rather than calling .flatten() (several times slower per call on a 1-row request).
    start, stop = 0, len(array)
    row_shape: list[int] = []
    while True:
        if array.null_count and array.slice(start, stop - start).null_count:
            raise InvalidInput(
                f"column {name!r} contains nulls: fill or drop them "
                "(every row needs all its values)"
            )
        kind = array.type
        if isinstance(kind, pa.BaseExtensionType):  # e.g. arrow.fixed_shape_tensor
            array = array.storage
            continue
        if pa.types.is_fixed_size_list(kind):
            width = kind.list_size
            base = array.offset  # .values ignores the array's own slice offset
            start, stop = (base + start) * width, (base + stop) * width
            array = array.values
        elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
            offsets = array.offsets.to_numpy()[start : stop + 1]
            width = int(offsets[1] - offsets[0]) if len(offsets) > 1 else 0
            if len(offsets) > 2:
                lengths = np.diff(offsets)
                if (lengths != width).any():
                    other = int(lengths[np.argmax(lengths != width)])
                    raise InvalidInput(
                        f"column {name!r} has rows of different lengths ({width} and {other} "
                        "values): every row must have the same number of values"
                    )
            start, stop = int(offsets[0]), int(offsets[-1])
            array = array.values
        elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
            break
        else:
            where = " inside its lists" if row_shape else ""
            raise InvalidInput(
                f"column {name!r} holds {kind} values{where}: send numbers, e.g. "
                "fixed_size_list<float32>[N] or list<float64> per row"
            )
        row_shape.append(width)
    if array.null_count or pa.types.is_boolean(kind):
        # Bit-packed or null-bearing: only this slice may be converted (it is a copy anyway).
        values = array.slice(start, stop - start).to_numpy(zero_copy_only=False)
    else:
        values = array.to_numpy()[start:stop]
    return values, tuple(row_shape)


def cast_values(values: Array, dtype: np.dtype[Any], what: str) -> Array:
    """Cast to a model's element type, refusing casts that would silently change values.

    Float to narrower float is accepted (float64 input for a float model is the tutorial's
    case); float to integer needs whole numbers, and integers must fit the target type.

    Raises:
        InvalidInput: fractional/non-finite values for an integer input, or integers out of range.
    """
    if values.dtype == dtype:
        return values
    if dtype.kind in "iu" and values.size:
        fractional = values.dtype.kind == "f" and (
            not np.isfinite(values).all() or (values != np.trunc(values)).any()
        )
        if fractional:
            raise InvalidInput(f"{what} takes {dtype} but the values are not all whole numbers")
        if not np.can_cast(values.dtype, dtype):
            info = np.iinfo(dtype)
            if values.min() < info.min or values.max() > info.max:
                raise InvalidInput(
                    f"{what} takes {dtype} but some values are outside [{info.min}, {info.max}]"
                )
    if dtype.kind == "f":
        with np.errstate(over="ignore"):  # out-of-range values become inf, like any float cast
            return values.astype(dtype)
    return values.astype(dtype)


def ndarray_to_arrow(values: Array) -> pa.Array:
    """One Arrow value per entry of the first axis: `[N]` -> a plain column, `[N, k]` ->
    `list<dtype>` with k values per row, further axes -> nested lists. No per-row Python work.

    Raises:
        InvalidInput: the result is too large for 32-bit list offsets (send fewer rows).
    """
    shape = values.shape
    if len(shape) == 0:
        raise ValueError("a scalar cannot become a column: the output has no row axis")
    flat = values.reshape(-1)
    if not flat.flags.c_contiguous:  # a strided 1-D view stays strided through reshape
        flat = np.ascontiguousarray(flat)
    plain = _PLAIN_TYPES.get(flat.dtype)
    if plain is None:
        array = pa.array(flat)
    else:  # zero-copy, and cheaper than pa.array's type inference
        array = pa.Array.from_buffers(plain, len(flat), [None, pa.py_buffer(flat)])
    for axis in range(len(shape) - 1, 0, -1):
        outer, width = math.prod(shape[:axis]), int(shape[axis])
        if outer * width > _INT32_MAX:
            raise InvalidInput(
                f"the response would hold {outer * width} values in one column: send fewer rows"
            )
        array = pa.ListArray.from_arrays(_list_offsets(outer, width), array)
    return array


def array_of(values: Array, kind: pa.DataType) -> pa.Array:
    """A column of type `kind` (a fixed-width primitive or a fixed_size_list of one) holding
    `values` (`[rows]` or `[rows, width]`), zero-copy."""
    flat = np.ascontiguousarray(values).reshape(-1)
    if pa.types.is_fixed_size_list(kind):
        if kind.list_size < 1:
            raise InvalidInput("a fixed_size_list column must hold at least one value per row")
        child = pa.Array.from_buffers(kind.value_type, len(flat), [None, pa.py_buffer(flat)])
        return pa.FixedSizeListArray.from_arrays(child, type=kind)
    return pa.Array.from_buffers(kind, len(flat), [None, pa.py_buffer(flat)])


def tensor_to_arrow(values: Array) -> pa.Array:
    """`[N, a, b]` -> fixed_size_list<fixed_size_list<dtype>[b]>[a]: zero-copy, no offsets."""
    array = ndarray_to_arrow(values.reshape(-1))
    for width in reversed(values.shape[1:]):
        array = pa.FixedSizeListArray.from_arrays(array, int(width))
    return array


def timestamp_column(epoch_ms: int | Array, rows: int) -> pa.Array:
    """A `timestamp[ms]` column repeating one instant `rows` times (or of one instant a row)."""
    data = (
        np.full(rows, epoch_ms, dtype=np.int64)
        if isinstance(epoch_ms, int)
        else np.ascontiguousarray(epoch_ms, dtype=np.int64)
    )
    return pa.Array.from_buffers(_TIMESTAMP_MS, rows, [None, pa.py_buffer(data)])


def int32_zeros(rows: int) -> pa.Array:
    """An `int32` column of zeros (the `check_failures` column until checks exist)."""
    if rows <= _CACHED_ROWS:
        return _cached_zeros(rows)
    return pa.array(np.zeros(rows, dtype=np.int32))


@functools.lru_cache(maxsize=64)
def _cached_zeros(rows: int) -> pa.Array:
    return pa.array(np.zeros(rows, dtype=np.int32))


def _list_offsets(count: int, width: int) -> pa.Array:
    if count <= _CACHED_ROWS:
        return _cached_offsets(count, width)
    return pa.array(np.arange(count + 1, dtype=np.int32) * np.int32(width))


@functools.lru_cache(maxsize=256)
def _cached_offsets(count: int, width: int) -> pa.Array:
    return pa.array(np.arange(count + 1, dtype=np.int32) * np.int32(width))
