"""The native Infer path for the common request shape, without building Arrow objects.

Nearly every client sends the same thing request after request: an IPC stream of one record
batch whose columns are fixed-width (`fixed_size_list<float32>[18]` in the tutorial), without
nulls. For that shape a request is a known schema message, one batch message and the end
marker; its values are one contiguous buffer each. `read_request` checks the batch's
flatbuffer metadata (lengths, null counts, buffer bounds, no compression) and hands back numpy
views of the request's own bytes. An answer of a given version, request schema and row count
always has the same layout, so `AnswerTemplate` keeps the first answer that pyarrow wrote and
later answers are that template with the time, input and output values put in place.

Anything else (other types, nulls, several batches, dictionaries, a schema not seen before
that does not fit) returns None and takes the general path in `arrow_io`, which reads every
request the same way and refuses what this path would.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from hotswap.engine.arrow_io import (
    Array,
    BoundedCache,
    field_position,
    read_offset,
    read_pairs,
    read_scalar,
    root_table,
)

_CONTINUATION = b"\xff\xff\xff\xff"
_RECORD_BATCH = 3  # Message.header_type of a RecordBatch (Arrow's Message.fbs MessageHeader)


@dataclass(frozen=True, slots=True)
class _Column:
    name: str
    dtype: np.dtype[Any]
    width: int  # values per row: 1 for a primitive column, N for fixed_size_list[N]
    nested: bool  # a fixed_size_list (two field nodes, three buffers) or a primitive (one, two)


@dataclass(frozen=True, slots=True)
class RequestLayout:
    """What a request schema's batches hold, when every column is fixed-width."""

    schema: pa.Schema
    columns: tuple[_Column, ...]

    @classmethod
    def of(cls, schema: pa.Schema) -> RequestLayout | None:
        if len(set(schema.names)) != len(schema.names):
            return None  # duplicate names: the general path refuses them as ambiguous
        columns = []
        for field in schema:
            kind, nested = field.type, False
            if pa.types.is_fixed_size_list(kind):
                width, kind, nested = kind.list_size, kind.value_type, True
            else:
                width = 1
            if width < 1 or not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
                return None  # (pyarrow cannot even build a zero-width list back: SIGFPE)
            columns.append(_Column(field.name, np.dtype(kind.to_pandas_dtype()), width, nested))
        return cls(schema, tuple(columns)) if columns else None


# Request schemas by their metadata bytes; None for a schema this path does not read.
_LAYOUTS: BoundedCache[bytes, RequestLayout | None] = BoundedCache(64)
_UNSEEN = object()
# Schemas bigger than this (custom metadata, many columns) are not kept: 64 of them would pin
# memory, and such a client is not the common case this path is for.
_LAYOUT_KEY_MAX = 4096


def read_request(data: bytes, max_rows: int) -> tuple[RequestLayout, dict[str, Array]] | None:
    """The columns of a request in the common shape, as `[rows, width]` (or `[rows]`) views of
    `data`; None when the request is not in that shape (the general path reads it then).

    A request past `max_rows` also returns None: the general path refuses it with the message.
    """
    if data[:4] != _CONTINUATION or len(data) < 16:
        return None
    (meta_size,) = struct.unpack_from("<i", data, 4)
    if not 0 < meta_size <= _LAYOUT_KEY_MAX or meta_size % 8:
        return None
    schema_end = 8 + meta_size
    key = data[8:schema_end]
    try:
        seen = _LAYOUTS.get(key, _UNSEEN)
        layout = _layout_of(data[:schema_end], key) if seen is _UNSEEN else seen
        if not isinstance(layout, RequestLayout):
            return None
        return _read_batch(data, schema_end, layout, max_rows)
    except (struct.error, IndexError, ValueError):
        return None  # malformed metadata: the general path says what is wrong


def _layout_of(schema_message: bytes, key: bytes) -> RequestLayout | None:
    try:
        schema = pa.ipc.read_schema(pa.py_buffer(schema_message))
    except (pa.ArrowException, ValueError, OSError):
        return None
    # Schema.endianness (field 0 of the Schema table): big-endian values need byte swapping,
    # which the general path does.
    meta = schema_message[8:]
    header = read_offset(meta, root_table(meta), 2)
    layout = None if read_scalar(meta, header, 0, "<h") != 0 else RequestLayout.of(schema)
    _LAYOUTS.put(key, layout)
    return layout


def _read_batch(
    data: bytes, at: int, layout: RequestLayout, max_rows: int
) -> tuple[RequestLayout, dict[str, Array]] | None:
    if data[at : at + 4] != _CONTINUATION:
        return None
    (meta_size,) = struct.unpack_from("<i", data, at + 4)
    if meta_size <= 0 or meta_size % 8:
        return None
    meta_start = at + 8
    body_start = meta_start + meta_size
    meta = data[meta_start:body_start]
    message = root_table(meta)
    if read_scalar(meta, message, 1, "<B") != _RECORD_BATCH:
        return None
    body_size = read_scalar(meta, message, 3, "<q")
    body_end = body_start + body_size
    # One batch and the end of the stream (or of the bytes), nothing else.
    if not 0 <= body_size <= len(data) - body_start:
        return None
    if data[body_end:] not in (b"", _CONTINUATION + b"\0\0\0\0", b"\0\0\0\0"):
        return None
    batch = read_offset(meta, message, 2)
    if batch == 0 or field_position(meta, batch, 3):  # no header, or compressed
        return None
    rows = read_scalar(meta, batch, 0, "<q")
    if not 0 < rows <= max_rows:
        return None
    nodes = read_pairs(meta, batch, 1)
    buffers = read_pairs(meta, batch, 2)
    columns: dict[str, Array] = {}
    node, buffer = 0, 0
    for column in layout.columns:
        lengths = (rows, rows * column.width) if column.nested else (rows,)
        for length in lengths:
            if node >= len(nodes) or nodes[node] != (length, 0):  # (length, null count)
                return None
            node += 1
        buffer += 2 if column.nested else 1  # validity buffers, unused without nulls
        if buffer >= len(buffers):
            return None
        offset, size = buffers[buffer]
        buffer += 1
        count = rows * column.width
        if offset < 0 or size < count * column.dtype.itemsize or offset + size > body_size:
            return None
        values = np.frombuffer(data, column.dtype, count, body_start + offset)
        columns[column.name] = values.reshape(rows, column.width) if column.nested else values
    if node != len(nodes) or buffer != len(buffers):
        return None
    return layout, columns


class AnswerTemplate:
    """An answer's bytes with holes where one request's values go: the time column, each
    echoed input and each output (in the answer's column order)."""

    __slots__ = ("_holes", "_pieces")

    def __init__(self, pieces: list[bytes], holes: list[int]) -> None:
        self._pieces = pieces  # constant bytes around the holes: len(holes) + 1 pieces
        self._holes = holes  # each hole's size in bytes

    @classmethod
    def of(cls, answer: bytes, result: pa.RecordBatch, leaves: Sequence[int]) -> AnswerTemplate:
        """The template of `answer` (the IPC stream of `result`); `leaves` are the columns
        whose values change from request to request."""
        (schema_size,) = struct.unpack_from("<i", answer, 4)
        at = 8 + schema_size
        (meta_size,) = struct.unpack_from("<i", answer, at + 4)
        meta = answer[at + 8 : at + 8 + meta_size]
        body_start = at + 8 + meta_size
        batch = read_offset(meta, root_table(meta), 2)
        buffers = read_pairs(meta, batch, 2)
        positions = _leaf_buffers(result.schema)
        pieces, holes, cursor = [], [], 0
        for column in leaves:
            offset, size = buffers[positions[column]]
            pieces.append(answer[cursor : body_start + offset])
            holes.append(size)
            cursor = body_start + offset + size
        pieces.append(answer[cursor:])
        return cls(pieces, holes)

    def render(self, values: Sequence[bytes | memoryview]) -> bytes | None:
        """The answer with `values` in the holes; None if one does not fit its hole exactly
        (padding differs, so the caller encodes that answer the general way)."""
        parts: list[bytes | memoryview] = []
        for piece, hole, value in zip(self._pieces[:-1], self._holes, values, strict=True):
            if len(value) != hole:
                return None
            parts += (piece, value)
        parts.append(self._pieces[-1])
        return b"".join(parts)


def _leaf_buffers(schema: pa.Schema) -> list[int]:
    """For each column, the index of its values buffer among the batch's buffers."""
    positions, index = [], 0
    for field in schema:
        index, leaf = _walk(field.type, index)
        positions.append(leaf)
    return positions


def _walk(kind: pa.DataType, index: int) -> tuple[int, int]:
    """(next buffer index, index of the values buffer) of a column of type `kind` whose
    buffers start at `index`: validity first, list offsets next, then the child's."""
    if pa.types.is_fixed_size_list(kind):
        return _walk(kind.value_type, index + 1)
    if pa.types.is_list(kind):
        return _walk(kind.value_type, index + 2)
    return index + 2, index + 1
