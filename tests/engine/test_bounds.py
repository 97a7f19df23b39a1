"""What the engine refuses before it spends memory: compressed or oversized Arrow IPC (read from
the messages' metadata, before a body is decoded) and a full inference queue."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from hotswap.engine.arrow_io import decode_ipc
from hotswap.engine.dataplane import InferenceQueue
from hotswap.engine.errors import InvalidInput, Overloaded, RequestTooLarge


def _table(rows: int) -> pa.Table:
    flat = pa.array(np.ones(rows * 18, np.float32))
    return pa.table({"tensor": pa.FixedSizeListArray.from_arrays(flat, 18)})


def _stream(table: pa.Table, batches: int = 1, compression: str | None = None) -> bytes:
    sink = pa.BufferOutputStream()
    options = ipc.IpcWriteOptions(compression=compression)
    with ipc.new_stream(sink, table.schema, options=options) as writer:
        for _ in range(batches):
            writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def test_rows_are_counted_from_metadata_across_batches() -> None:
    data = _stream(_table(300), batches=3)
    with pytest.raises(RequestTooLarge, match="900 rows"):
        decode_ipc(data, max_rows=899)
    assert decode_ipc(data, max_rows=900).num_rows == 900


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_compressed_bodies_are_refused(codec: str) -> None:
    # 10,000 rows of ones compress to almost nothing: the decompressed size is the sender's.
    data = _stream(_table(10_000), compression=codec)
    assert len(data) < 100_000
    with pytest.raises(InvalidInput, match="compressed Arrow IPC is not accepted"):
        decode_ipc(data)


def test_a_length_the_body_cannot_hold_is_refused() -> None:
    # A null column of 2**40 rows has no buffers at all: only its metadata claims the length.
    schema = pa.schema([("n", pa.null())])
    batch = pa.RecordBatch.from_arrays([pa.nulls(1)], schema=schema)
    data = _stream(pa.Table.from_batches([batch]))
    assert decode_ipc(data).num_rows == 1
    # The batch's length and its node's length and null count: the only 64-bit ones.
    lying = data.replace((1).to_bytes(8, "little"), (2**40).to_bytes(8, "little"))
    assert lying != data
    with pytest.raises(InvalidInput, match="claims 1099511627776 elements"):
        decode_ipc(lying, max_rows=2**62)


async def test_a_full_inference_queue_refuses_at_once() -> None:
    release = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as executor:
        queue = InferenceQueue(executor, max_queued=2)
        running = [asyncio.ensure_future(queue.run(release.wait, 10)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="at capacity"):
            await queue.run(release.wait, 10)
        release.set()
        assert await asyncio.gather(*running) == [True, True]
        assert queue.queued == 0


def test_a_file_is_read_as_the_stream_it_holds_not_by_its_footer() -> None:
    small = _table(10)
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, small.schema) as writer:
        writer.write_table(small)
    assert decode_ipc(bytes(sink.getvalue().to_pybytes()), max_rows=10).num_rows == 10
    # A file of a compressed 100,000-row batch whose stream is cut short right after the
    # magic by an end-of-stream marker: the stream holds nothing, the footer still points at
    # the batch. Read by its footer, the 10-row limit and the compression check are bypassed.
    forged = pa.BufferOutputStream()
    options = ipc.IpcWriteOptions(compression="zstd")
    with ipc.new_file(forged, small.schema, options=options) as writer:
        writer.write_table(_table(100_000))
    data = bytes(forged.getvalue().to_pybytes())
    end_of_stream = b"\xff\xff\xff\xff\x00\x00\x00\x00"
    crafted = data[:8] + end_of_stream + data[16:]
    assert ipc.open_file(pa.py_buffer(crafted)).read_all().num_rows == 100_000  # the trap
    with pytest.raises((InvalidInput, RequestTooLarge)):
        decode_ipc(data, max_rows=10)
    with pytest.raises(InvalidInput):
        decode_ipc(crafted, max_rows=10)


async def test_queued_bytes_are_bounded_too() -> None:
    release = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as executor:
        queue = InferenceQueue(executor, max_queued=100, max_queued_bytes=1000)
        first = asyncio.ensure_future(queue.run(release.wait, 10, nbytes=900))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="900 bytes"):
            await queue.run(release.wait, 10, nbytes=200)
        small = asyncio.ensure_future(queue.run(release.wait, 10, nbytes=50))
        await asyncio.sleep(0)
        release.set()
        assert list(await asyncio.gather(first, small)) == [True, True]
        assert queue.queued_bytes == 0
