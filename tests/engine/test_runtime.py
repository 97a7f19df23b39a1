"""LoadedPipeline against real ONNX Runtime: the tutorial's models and small generated ones."""

from __future__ import annotations

import gc
import json
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as npst
from onnx import TensorProto, helper, numpy_helper

from hotswap.engine.errors import InvalidInput, PrepareError
from hotswap.engine.runtime import (
    LoadedPipeline,
    PipelineSpec,
    RuntimeOptions,
    StepSpec,
    decode_ipc,
    encode_ipc,
)

F = TensorProto.FLOAT
Dim = int | str | None
ONE_THREAD = RuntimeOptions()


# --- helpers --------------------------------------------------------------------------------


def _io(name: str, elem: int, shape: Sequence[Dim] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def write_model(
    path: Path,
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    constants: dict[str, np.ndarray] | None = None,
) -> Path:
    initializers = [numpy_helper.from_array(v, k) for k, v in (constants or {}).items()]
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # what this onnxruntime reads, whatever onnx writes by default
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def affine(path: Path, shape: Sequence[Dim] = ("N", 1), name: str = "x") -> Path:
    """y = x * 2 + 1."""
    return write_model(
        path,
        [
            helper.make_node("Mul", [name, "two"], ["t"]),
            helper.make_node("Add", ["t", "one"], ["y"]),
        ],
        [_io(name, F, shape)],
        [_io("y", F, shape)],
        {"two": np.array(2, np.float32), "one": np.array(1, np.float32)},
    )


def spec(*steps: tuple[str, Path], number: int = 7) -> PipelineSpec:
    return PipelineSpec(
        workspace="ws",
        pipeline="housing",
        version_id="0b7c8f1e-0000-4000-8000-000000000001",
        number=number,
        steps=tuple(
            StepSpec(name, f"00000000-0000-4000-8000-00000000000{i}", f"sha{i}", path)
            for i, (name, path) in enumerate(steps)
        ),
    )


def build(*steps: tuple[str, Path], options: RuntimeOptions = ONE_THREAD) -> LoadedPipeline:
    return LoadedPipeline.build(spec(*steps), options)


def out_values(table: pa.RecordBatch, name: str = "out.variable") -> np.ndarray:
    column = table.column(name)
    width = len(column[0].as_py()) if pa.types.is_list(column.type) else 0
    flat: np.ndarray = column.flatten().to_numpy() if width else column.to_numpy()
    return flat.reshape(len(column), -1) if width else flat


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    result: np.ndarray = session.run(None, {session.get_inputs()[0].name: x})[0]
    return result


def file_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


@pytest.fixture(scope="module")
def xtest(assets: Path) -> pa.Table:
    return ipc.open_file(assets / "data" / "xtest-1k.arrow").read_all()


@pytest.fixture(scope="module")
def xtest_numpy(xtest: pa.Table) -> np.ndarray:
    return np.array(xtest.column("tensor").to_pylist(), dtype=np.float32)


# --- the tutorial's models ------------------------------------------------------------------


@pytest.mark.parametrize("model", ["rf", "gbr", "xgb"])
@pytest.mark.parametrize("rows", [1, 1000])
@pytest.mark.parametrize("encode", [encode_ipc, file_ipc], ids=["stream", "file"])
def test_tutorial_models_match_onnx_runtime(
    assets: Path,
    xtest: pa.Table,
    xtest_numpy: np.ndarray,
    model: str,
    rows: int,
    encode: Callable[[pa.Table], bytes],
) -> None:
    path = assets / "models" / f"{model}_model.onnx"
    pipeline = build((f"housing-{model}", path))
    # Row 3 alone exercises a sliced column (non-zero offset) when encoded.
    table = xtest.slice(3, 1) if rows == 1 else xtest
    result = pipeline.infer(decode_ipc(encode(table)))
    expected = ort_run(path, xtest_numpy[3:4] if rows == 1 else xtest_numpy)
    assert result.num_rows == rows
    np.testing.assert_allclose(out_values(result), expected, rtol=1e-6)


def test_sliced_table_in_process(assets: Path, xtest: pa.Table, xtest_numpy: np.ndarray) -> None:
    path = assets / "models" / "rf_model.onnx"
    result = build(("rf", path)).infer(xtest.slice(500, 7))
    np.testing.assert_allclose(out_values(result), ort_run(path, xtest_numpy[500:507]), rtol=1e-6)


def test_tutorial_json_input_as_list_of_double(assets: Path) -> None:
    records = json.loads((assets / "data" / "xtest-1.df.json").read_text())
    table = pa.table({"tensor": [r["tensor"] for r in records]})
    assert table.schema.field("tensor").type == pa.list_(pa.float64())
    path = assets / "models" / "gbr_model.onnx"
    x = np.array([r["tensor"] for r in records], dtype=np.float32)
    result = build(("gbr", path)).infer(table)
    np.testing.assert_allclose(out_values(result), ort_run(path, x), rtol=1e-6)


def test_column_may_carry_the_onnx_input_name(assets: Path, xtest: pa.Table) -> None:
    pipeline = build(("xgb", assets / "models" / "xgb_model.onnx"))
    assert pipeline.input_columns() == ["tensor"]
    renamed = xtest.slice(0, 5).rename_columns(["input"])
    assert out_values(pipeline.infer(renamed)).shape == (5, 1)
    # rf's input is float_input: the xgb name is not accepted for it.
    rf = build(("rf", assets / "models" / "rf_model.onnx"))
    with pytest.raises(InvalidInput, match=r"no column 'tensor' or 'float_input'.*\['input'\]"):
        rf.infer(renamed)


def test_output_schema_and_metadata(assets: Path, xtest: pa.Table) -> None:
    pipeline = build(("housing-rf", assets / "models" / "rf_model.onnx"))
    table = xtest.slice(0, 3).append_column("id", pa.array(["a", "b", "c"]))
    before = time.time_ns() // 1_000_000
    result = pipeline.infer(table)
    after = time.time_ns() // 1_000_000
    assert result.column_names == ["time", "in.tensor", "in.id", "out.variable", "check_failures"]
    types = [f.type for f in result.schema]
    assert types == [
        pa.timestamp("ms"),
        pa.list_(pa.float32(), 18),
        pa.string(),
        pa.list_(pa.float32()),
        pa.int32(),
    ]
    times = set(result.column("time").cast(pa.int64()).to_pylist())
    assert len(times) == 1
    assert before <= times.pop() <= after
    assert result.column("in.tensor").equals(table.column("tensor").combine_chunks())
    assert result.column("in.id").to_pylist() == ["a", "b", "c"]
    assert result.column("check_failures").to_pylist() == [0, 0, 0]
    metadata = result.schema.metadata
    assert metadata[b"hotswap.workspace"] == b"ws"
    assert metadata[b"hotswap.pipeline"] == b"housing"
    assert metadata[b"hotswap.pipeline_version"] == b"7"
    assert metadata[b"hotswap.pipeline_version_id"] == b"0b7c8f1e-0000-4000-8000-000000000001"
    assert json.loads(metadata[b"hotswap.models"]) == [
        {"name": "housing-rf", "version": "00000000-0000-4000-8000-000000000000", "sha256": "sha0"}
    ]
    # The same schema again (served from the per-pipeline cache) and after a different input.
    assert pipeline.infer(table).schema.equals(result.schema, check_metadata=True)
    other = pipeline.infer(pa.table({"tensor": xtest.column("tensor").to_pylist()[:2]}))
    assert other.schema.field("in.tensor").type == pa.list_(pa.float64())
    assert other.schema.metadata == metadata
    assert pipeline.infer(table).schema.equals(result.schema, check_metadata=True)


def test_response_round_trips_through_ipc(assets: Path, xtest: pa.Table) -> None:
    pipeline = build(("rf", assets / "models" / "rf_model.onnx"))
    result = pipeline.infer(xtest.slice(0, 4))
    assert decode_ipc(encode_ipc(result)).equals(result, check_metadata=True)


def test_build_reports_timings_and_threads(assets: Path) -> None:
    path = assets / "models" / "rf_model.onnx"
    pipeline = build(("rf", path), options=RuntimeOptions(intra_op_threads=0, inter_op_threads=0))
    assert pipeline.load_ms > 0
    assert pipeline.warmup_ms > 0
    assert "ws/housing v7" in repr(pipeline)
    with pytest.raises(ValueError, match=">= 0"):
        RuntimeOptions(intra_op_threads=-1)


def test_concurrent_requests_each_get_their_own_rows(
    assets: Path, xtest: pa.Table, xtest_numpy: np.ndarray
) -> None:
    path = assets / "models" / "rf_model.onnx"
    pipeline = build(("rf", path))
    expected = ort_run(path, xtest_numpy)

    def one(start: int) -> bool:
        rows = 1 + start % 5
        got = out_values(pipeline.infer(xtest.slice(start, rows)))
        return bool(np.allclose(got, expected[start : start + rows], rtol=1e-6))

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(one, range(0, 990, 3)))


def test_sessions_are_released_with_the_pipeline(assets: Path) -> None:
    pipeline = build(("rf", assets / "models" / "rf_model.onnx"))
    ref = weakref.ref(pipeline)
    del pipeline
    gc.collect()
    assert ref() is None


# --- bad requests ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rf(assets: Path) -> LoadedPipeline:
    return LoadedPipeline.build(
        spec(("housing-rf", assets / "models" / "rf_model.onnx")), ONE_THREAD
    )


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            pa.table({"tensor": pa.array([[1.0] * 17], type=pa.list_(pa.float32(), 17))}),
            "column 'tensor' has 17 values per row; model 'housing-rf' expects 18",
        ),
        (pa.table({"features": [[1.0] * 18]}), "no column 'tensor' or 'float_input'"),
        (pa.table({"tensor": ["a"]}), "column 'tensor' holds string values"),
        (pa.table({"tensor": [[1.0] * 18, None]}), "column 'tensor' contains nulls"),
        (pa.table({"tensor": [[1.0] * 17 + [None]]}), "column 'tensor' contains nulls"),
        (pa.table({"tensor": [[1.0] * 18, [1.0] * 17]}), "different lengths"),
        (
            pa.table({"tensor": pa.array([], type=pa.list_(pa.float32(), 18))}),
            "the table has no rows",
        ),
    ],
    ids=["width-17", "wrong-name", "string", "null-row", "null-value", "ragged", "no-rows"],
)
def test_bad_tables_are_invalid_input(rf: LoadedPipeline, table: pa.Table, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        rf.infer(table)


@pytest.mark.parametrize(
    ("data", "message"), [(b"", "empty"), (b"\x00junk" * 10, "not a valid Arrow IPC")]
)
def test_bad_bytes_are_invalid_input(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode_ipc(data)


# --- chains of steps ------------------------------------------------------------------------


def test_two_step_chain(
    assets: Path, tmp_path: Path, xtest: pa.Table, xtest_numpy: np.ndarray
) -> None:
    rf_path = assets / "models" / "rf_model.onnx"
    pipeline = build(("rf", rf_path), ("affine", affine(tmp_path / "affine.onnx")))
    result = pipeline.infer(xtest.slice(0, 10))
    assert result.column_names == ["time", "in.tensor", "out.y", "check_failures"]
    expected = ort_run(rf_path, xtest_numpy[:10]) * 2 + 1
    np.testing.assert_allclose(out_values(result, "out.y"), expected, rtol=1e-6)
    models = json.loads(result.schema.metadata[b"hotswap.models"])
    assert [m["name"] for m in models] == ["rf", "affine"]


def test_chain_reshapes_n_by_1_into_n(assets: Path, tmp_path: Path, xtest: pa.Table) -> None:
    pipeline = build(
        ("rf", assets / "models" / "rf_model.onnx"),
        ("flat", affine(tmp_path / "flat.onnx", shape=("N",))),
    )
    result = pipeline.infer(xtest.slice(0, 3))
    assert result.schema.field("out.y").type == pa.float32()  # [N] output: a plain column
    assert result.num_rows == 3


def two_outputs(path: Path) -> Path:
    """a, b [N,3] -> sum = a + b, diff = a - b."""
    return write_model(
        path,
        [
            helper.make_node("Add", ["a", "b"], ["sum"]),
            helper.make_node("Sub", ["a", "b"], ["diff"]),
        ],
        [_io("a", F, ["N", 3]), _io("b", F, ["N", 3])],
        [_io("sum", F, ["N", 3]), _io("diff", F, ["N", 3])],
    )


def test_multi_input_first_step_and_outputs_by_name(tmp_path: Path) -> None:
    product = write_model(
        tmp_path / "product.onnx",
        [helper.make_node("Mul", ["diff", "sum"], ["product"])],
        [_io("diff", F, ["N", 3]), _io("sum", F, ["N", 3])],
        [_io("product", F, ["N", 3])],
    )
    pipeline = build(("pm", two_outputs(tmp_path / "pm.onnx")), ("product", product))
    assert pipeline.input_columns() == ["a", "b"]
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.full((2, 3), 2, dtype=np.float32)
    table = pa.table({"a": a.tolist(), "b": pa.array(b.tolist(), type=pa.list_(pa.float32(), 3))})
    result = pipeline.infer(table)
    assert result.column_names == ["time", "in.a", "in.b", "out.product", "check_failures"]
    np.testing.assert_allclose(out_values(result, "out.product"), (a + b) * (a - b))
    with pytest.raises(InvalidInput, match=r"no column 'b' \(model 'pm' input 'b' reads it\)"):
        pipeline.infer(table.select(["a"]))


def test_single_input_step_takes_the_output_named_like_its_input(tmp_path: Path) -> None:
    pipeline = build(
        ("pm", two_outputs(tmp_path / "pm.onnx")),
        ("affine", affine(tmp_path / "affine.onnx", shape=("N", 3), name="diff")),
    )
    a = np.ones((1, 3), np.float32)
    result = pipeline.infer(pa.table({"a": a.tolist(), "b": (a * 4).tolist()}))
    np.testing.assert_allclose(out_values(result, "out.y"), (a - a * 4) * 2 + 1)


def test_last_step_returns_every_output(tmp_path: Path) -> None:
    pipeline = build(("pm", two_outputs(tmp_path / "pm.onnx")))
    result = pipeline.infer(pa.table({"a": [[1.0, 2.0, 3.0]], "b": [[1.0, 1.0, 1.0]]}))
    assert result.column_names[-3:] == ["out.sum", "out.diff", "check_failures"]
    assert result.column("out.diff").to_pylist() == [[0.0, 1.0, 2.0]]


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (
            lambda p: affine(p, shape=("N", 2)),
            r"step 1 \(model 'second'\) input 'x' takes 2 value\(s\) per row but "
            r"step 0 \(model 'rf'\) output 'variable' gives 1",
        ),
        (
            lambda p: write_model(
                p,
                [helper.make_node("Identity", ["x"], ["y"])],
                [_io("x", TensorProto.DOUBLE, ["N", 1])],
                [_io("y", TensorProto.DOUBLE, ["N", 1])],
            ),
            r"step 1 \(model 'second'\) input 'x' takes tensor\(double\) but .* gives "
            r"tensor\(float\)",
        ),
        (
            lambda p: two_outputs(p),
            r"step 1 \(model 'second'\) takes inputs \['a', 'b'\] that step 0 \(model 'rf'\) "
            r"does not output \(its outputs: \['variable'\]\)",
        ),
    ],
    ids=["width", "dtype", "names"],
)
def test_mismatched_chain_fails_at_build(
    assets: Path, tmp_path: Path, second: Callable[[Path], Path], message: str
) -> None:
    with pytest.raises(PrepareError, match=message):
        build(("rf", assets / "models" / "rf_model.onnx"), ("second", second(tmp_path / "s.onnx")))


# --- models that cannot be served -----------------------------------------------------------


def test_corrupt_or_missing_model_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf")
    with pytest.raises(PrepareError, match=r"step 0 \(model 'junk' version .*\) cannot be loaded"):
        build(("junk", junk))
    with pytest.raises(PrepareError, match=r"step 1 \(model 'gone' .*File doesn't exist"):
        build(("ok", affine(tmp_path / "a.onnx")), ("gone", tmp_path / "missing.onnx"))
    with pytest.raises(PrepareError, match="has no steps"):
        LoadedPipeline.build(spec(), ONE_THREAD)


def test_unservable_models_fail_at_build(tmp_path: Path) -> None:
    sequence_out = write_model(
        tmp_path / "seq.onnx",
        [helper.make_node("SequenceConstruct", ["x"], ["s"])],
        [_io("x", F, ["N", 2])],
        [helper.make_tensor_sequence_value_info("s", F, ["N", 2])],
    )
    with pytest.raises(PrepareError, match=r"output 's' is seq\(tensor\(float\)\).*only tensor"):
        build(("seq", sequence_out))
    strings = write_model(
        tmp_path / "str.onnx",
        [helper.make_node("Identity", ["x"], ["y"])],
        [_io("x", TensorProto.STRING, ["N", 1])],
        [_io("y", TensorProto.STRING, ["N", 1])],
    )
    with pytest.raises(PrepareError, match=r"input 'x' is tensor\(string\)"):
        build(("str", strings))
    scalar = write_model(
        tmp_path / "scalar.onnx",
        [helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)],
        [_io("x", F, ["N", 2])],
        [_io("y", F, [])],
    )
    with pytest.raises(PrepareError, match=r"warm-up .*step 0 \(model 'scalar'\) output 'y'"):
        build(("scalar", scalar))


def test_warm_up_failure_names_the_step(tmp_path: Path) -> None:
    # Reshaping one row of 4 values into 3 rows fails only when the model runs.
    reshape = write_model(
        tmp_path / "reshape.onnx",
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [_io("x", F, ["N", 4])],
        [_io("y", F, [3, None])],
        {"shape": np.array([3, -1], np.int64)},
    )
    with pytest.raises(PrepareError, match=r"warm-up .*step 1 \(model 'reshape'\)") as caught:
        build(("first", affine(tmp_path / "a.onnx", shape=("N", 4))), ("reshape", reshape))
    assert "Traceback" not in str(caught.value)


# --- other input shapes and types -----------------------------------------------------------


def test_integer_inputs_are_cast_and_checked(tmp_path: Path) -> None:
    double_ids = write_model(
        tmp_path / "ids.onnx",
        [helper.make_node("Add", ["ids", "ids"], ["twice"])],
        [_io("ids", TensorProto.INT64, ["N"])],
        [_io("twice", TensorProto.INT64, ["N"])],
    )
    pipeline = build(("ids", double_ids))
    result = pipeline.infer(pa.table({"tensor": pa.array([1.0, 5.0])}))
    assert result.schema.field("out.twice").type == pa.int64()
    assert result.column("out.twice").to_pylist() == [2, 10]
    assert pipeline.infer(pa.table({"ids": pa.array([3], pa.int32())})).column(
        "out.twice"
    ).to_pylist() == [6]
    with pytest.raises(InvalidInput, match=r"model 'ids' .*takes int64 but .*whole numbers"):
        pipeline.infer(pa.table({"tensor": [1.5]}))


def test_plain_column_feeds_an_n_by_1_input(tmp_path: Path) -> None:
    pipeline = build(("affine", affine(tmp_path / "a.onnx")))
    result = pipeline.infer(pa.table({"tensor": [1.0, 2.0]}))
    assert result.column("out.y").to_pylist() == [[3.0], [5.0]]


def test_rank_three_input_from_flat_or_nested_rows(tmp_path: Path) -> None:
    flatten = write_model(
        tmp_path / "flatten.onnx",
        [helper.make_node("Flatten", ["x"], ["y"], axis=1)],
        [_io("x", F, ["N", 2, 3])],
        [_io("y", F, ["N", 6])],
    )
    pipeline = build(("flatten", flatten))
    flat = pipeline.infer(pa.table({"tensor": [[0.0, 1, 2, 3, 4, 5]]}))
    nested = pipeline.infer(pa.table({"tensor": [[[0.0, 1, 2], [3, 4, 5]]]}))
    assert (
        flat.column("out.y").to_pylist()
        == nested.column("out.y").to_pylist()
        == [[0, 1, 2, 3, 4, 5]]
    )


def test_fixed_batch_model_refuses_other_row_counts(tmp_path: Path) -> None:
    pipeline = build(("one", affine(tmp_path / "one.onnx", shape=(1, 2))))
    assert pipeline.infer(pa.table({"tensor": [[1.0, 2.0]]})).num_rows == 1
    with pytest.raises(InvalidInput, match="takes exactly 1 row"):
        pipeline.infer(pa.table({"tensor": [[1.0, 2.0]] * 2}))


# --- properties -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def row_sum(tmp_path_factory: pytest.TempPathFactory) -> LoadedPipeline:
    """x [N, W] (W dynamic) -> total [N, 1] and doubled [N, W]."""
    path = write_model(
        tmp_path_factory.mktemp("models") / "row_sum.onnx",
        [
            helper.make_node("ReduceSum", ["x", "axes"], ["total"], keepdims=1),
            helper.make_node("Add", ["x", "x"], ["doubled"]),
        ],
        [_io("x", F, ["N", "W"])],
        [_io("total", F, ["N", 1]), _io("doubled", F, ["N", "W"])],
        {"axes": np.array([1], np.int64)},
    )
    return LoadedPipeline.build(spec(("row-sum", path)), ONE_THREAD)


@st.composite
def tensor_tables(draw: st.DrawFn) -> tuple[pa.Table, np.ndarray]:
    rows, width = draw(st.integers(1, 40)), draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    elements = st.floats(-1e6, 1e6, width=32 if dtype is np.float32 else 64)
    values = draw(npst.arrays(dtype, (rows, width), elements=elements))
    if draw(st.booleans()):
        column: Any = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width)
    else:
        column = pa.array(values.tolist(), type=pa.list_(pa.from_numpy_dtype(dtype)))
    offset = draw(st.integers(0, 3))  # a padded-then-sliced column, as IPC readers produce
    if offset:
        pad = pa.array([values[0].tolist()] * offset, type=column.type)
        column = pa.concat_arrays([pad, column]).slice(offset)
    return pa.table({"tensor": column}), values.astype(np.float32)


@settings(max_examples=30, deadline=None)
@given(case=tensor_tables())
def test_infer_keeps_one_output_row_per_input_row(
    row_sum: LoadedPipeline, case: tuple[pa.Table, np.ndarray]
) -> None:
    table, values = case
    result = row_sum.infer(table)
    assert result.num_rows == table.num_rows
    assert result.column("in.tensor").equals(table.column("tensor").combine_chunks())
    np.testing.assert_allclose(
        out_values(result, "out.total")[:, 0], values.sum(axis=1), rtol=1e-5, atol=1e-2
    )
    np.testing.assert_array_equal(out_values(result, "out.doubled"), values * 2)
