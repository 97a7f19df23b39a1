"""The native path's reader and answer templates: the same answers as the general path, and
every request it cannot vouch for left to the general path (which reads or refuses it)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from hotswap.engine.arrow_io import decode_ipc
from hotswap.engine.fast_ipc import read_request
from hotswap.engine.inference_log import InferenceLog, LogSettings
from hotswap.engine.runtime import LoadedPipeline, PipelineSpec, RuntimeOptions, StepSpec


@pytest.fixture(scope="module")
def rf(assets: Path) -> LoadedPipeline:
    model = assets / "models" / "rf_model.onnx"
    spec = PipelineSpec("ws", "p", "id-1", 1, (StepSpec("rf", "v", "s" * 64, model),))
    return LoadedPipeline.build(spec, RuntimeOptions())


@pytest.fixture(scope="module")
def xtest(assets: Path) -> np.ndarray:
    table = ipc.open_file(assets / "data" / "xtest-1k.arrow").read_all()
    return np.asarray(table.column("tensor").combine_chunks().flatten()).reshape(-1, 18)


def _stream(table: pa.Table, **options: object) -> bytes:
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema, options=ipc.IpcWriteOptions(**options)) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def _rows(x: np.ndarray, extra: bool = False) -> pa.Table:
    child = pa.array(x.astype(np.float32).reshape(-1))
    columns = {"tensor": pa.FixedSizeListArray.from_arrays(child, x.shape[1])}
    if extra:
        columns["k"] = pa.array(np.arange(len(x), dtype=np.int16))
    return pa.table(columns)


def _fast(rf: LoadedPipeline, data: bytes, exclude: frozenset[str] = frozenset()) -> pa.Table:
    read = read_request(data, 100_000)
    assert read is not None, "the common shape must take the fast path"
    layout, columns = read
    answer = rf.answer(rf.infer_arrays(columns, layout.schema), layout, exclude)
    return ipc.open_stream(answer).read_all()


def _general(rf: LoadedPipeline, data: bytes, exclude: frozenset[str] = frozenset()) -> pa.Table:
    return ipc.open_stream(rf.encode(rf.infer(decode_ipc(data)), exclude)).read_all()


@pytest.mark.parametrize("rows", [1, 7, 1000])
@pytest.mark.parametrize("exclude", [frozenset(), frozenset({"in"})])
def test_answers_equal_the_general_paths(
    rf: LoadedPipeline, xtest: np.ndarray, rows: int, exclude: frozenset[str]
) -> None:
    # The first request builds the template, the next ones (other values) are rendered from it.
    for start in (0, rows, 2 * rows):
        x = xtest[start % 500 : start % 500 + rows]
        data = _stream(_rows(x, extra=True))
        fast, general = _fast(rf, data, exclude), _general(rf, data, exclude)
        assert fast.schema.equals(general.schema, check_metadata=True)
        assert fast.drop_columns(["time"]).equals(general.drop_columns(["time"]))
        times = fast.column("time").cast(pa.int64()).to_numpy()
        assert abs(int(times[0]) - int(general.column("time")[0].value)) < 5_000
        if "in" not in exclude:
            assert fast.column("in.k").to_pylist() == list(range(rows))


def test_requests_outside_the_common_shape_take_the_general_path(xtest: np.ndarray) -> None:
    good = _rows(xtest[:4])
    assert read_request(_stream(good), 100) is not None
    with_nulls = pa.table({"tensor": pa.array([[1.0] * 18, None], pa.list_(pa.float32(), 18))})
    cases = {
        "nulls": _stream(with_nulls),
        "compressed": _stream(good, compression="zstd"),
        "two batches": _two_batches(good),
        "list<double>": _stream(pa.table({"tensor": [[1.0] * 18]})),
        "strings": _stream(pa.table({"tensor": ["a"]})),
        "file format": _file(good),
        # pyarrow itself cannot rebuild a zero-width list (SIGFPE): the general path echoes it.
        "zero width": _stream(
            good.append_column("z", pa.array([[]] * 4, pa.list_(pa.float32(), 0)))
        ),
        "duplicate names": _stream(pa.Table.from_arrays([good["tensor"]] * 2, ["tensor"] * 2)),
        "past max_rows": None,
    }
    for case, data in cases.items():
        if data is None:
            assert read_request(_stream(good), 3) is None, case
        else:
            assert read_request(data, 100) is None, case


def _two_batches(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def _file(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def _batch_metadata(data: bytes) -> tuple[int, int]:
    """(start, size) of the record batch message's flatbuffer in a one-batch stream."""
    (schema_size,) = struct.unpack_from("<i", data, 4)
    at = 8 + schema_size
    (size,) = struct.unpack_from("<i", data, at + 4)
    return at + 8, size


def test_lying_metadata_never_reads_outside_the_request(xtest: np.ndarray) -> None:
    data = _stream(_rows(xtest[:2]))
    start, size = _batch_metadata(data)
    meta = data[start : start + size]
    # The batch's length, its nodes' lengths: claim 2**40 rows of values the body does not hold.
    two = (2).to_bytes(8, "little")
    lying = data[:start] + meta.replace(two, (2**40).to_bytes(8, "little")) + data[start + size :]
    assert lying != data
    assert read_request(lying, 2**62) is None
    # A buffer said to start past the body.
    body_size = len(data) - (start + size) - 8
    offsets = [i for i in range(0, size - 8, 8) if meta[i : i + 8] == (0).to_bytes(8, "little")]
    assert offsets
    for i in offsets:
        forged = bytearray(data)
        forged[start + i : start + i + 8] = (body_size + 64).to_bytes(8, "little")
        read = read_request(bytes(forged), 100)
        if read is not None:  # that field was not an offset: the values must be the real ones
            np.testing.assert_array_equal(read[1]["tensor"], xtest[:2].astype(np.float32))
    # A negative or unaligned metadata size (the schema's or the batch's).
    for at in (4, start - 4):
        for claimed in (-8, -(len(data) - start), 3):
            forged = bytearray(data)
            forged[at : at + 4] = claimed.to_bytes(4, "little", signed=True)
            assert read_request(bytes(forged), 100) is None, (at, claimed)
    # Vectors (field nodes, buffers) claiming more entries than the metadata holds.
    vectors = 0
    for i in range(0, size - 4, 4):
        if meta[i : i + 4] in ((2).to_bytes(4, "little"), (3).to_bytes(4, "little")):
            forged = bytearray(data)
            forged[start + i : start + i + 4] = (10_000).to_bytes(4, "little")
            read = read_request(bytes(forged), 100)
            if read is None:
                vectors += 1
            else:  # that was not a vector length
                np.testing.assert_array_equal(read[1]["tensor"], xtest[:2].astype(np.float32))
    assert vectors >= 2  # the nodes' and the buffers' lengths were among them
    # Cut short anywhere: never an answer from bytes that are not there.
    for cut in range(8, len(data) - 8, 7):
        read = read_request(data[:cut], 100)
        assert read is None, cut


def test_logged_rows_of_many_requests_are_each_requests_own(
    rf: LoadedPipeline, xtest: np.ndarray, tmp_path: Path
) -> None:
    # The log builds the rows of a run of requests at once: each row must still be its own.
    log = InferenceLog(LogSettings(tmp_path), "engine-test")
    sent = [xtest[i : i + 1 + i % 3] for i in range(0, 40, 4)]  # 1-3 rows each
    for x in sent:
        read = read_request(_stream(_rows(x)), 100)
        assert read is not None
        inferred = rf.infer_arrays(read[1], read[0].schema)
        log.append(rf, inferred, 1000, 100)
    logged = log.query("ws", "p", 1000)
    assert logged is not None and logged.num_rows == sum(len(x) for x in sent)
    oldest_first = logged.take(pa.array(range(logged.num_rows - 1, -1, -1)))
    expected = np.concatenate(sent).astype(np.float32)
    got = np.asarray(oldest_first.column("in.tensor").to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(got, expected)
    served = np.asarray(oldest_first.column("out.variable").to_pylist(), dtype=np.float32)
    reference = np.concatenate(
        [rf.infer_arrays({"tensor": x.astype(np.float32)}).outputs[0] for x in sent]
    )
    np.testing.assert_array_equal(served, reference)
    assert oldest_first.schema.field("in.tensor").type == _rows(sent[0]).schema.field("tensor").type
