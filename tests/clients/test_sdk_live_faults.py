"""The SDK's error mapping, batching, balancing, retry, timeouts and uploads against the real
stack: a control plane and engines as separate processes on real ports, real ONNX Runtime, and
real signals (SIGKILL, SIGSTOP) for the faults. The tutorial flow is in test_sdk_live.py."""

from __future__ import annotations

import hashlib
import itertools
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pyarrow as pa
import pytest
from onnx import TensorProto, helper

import hotswap
from hotswap.clients._client import UPLOAD_CHUNK_BYTES
from hotswap.clients._convert import read_table_file
from hotswap.clients._stack import LocalStack

_names = (f"faults{i}" for i in itertools.count())
_T = TypeVar("_T")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """One control plane and one engine, shared by the tests that do not hurt them."""
    with LocalStack(tmp_path_factory.mktemp("stack"), engines=1) as running:
        yield running


@pytest.fixture
def wl(stack: LocalStack) -> Iterator[hotswap.Client]:
    """A client in a workspace of its own, so tests sharing the stack never collide."""
    with hotswap.Client(stack.control_address) as client:
        client.set_current_workspace(client.create_workspace(next(_names)))
        yield client


def _rf(client: hotswap.Client, assets: Path, replicas: int = 1) -> hotswap.Pipeline:
    model = client.upload_model("rf", assets / "models" / "rf_model.onnx")
    config = hotswap.DeploymentConfigBuilder().replica_count(replicas).build()
    return client.build_pipeline("p").add_model_step(model).deploy(deployment_config=config)


def _reference(model: Path, x: np.ndarray) -> np.ndarray:
    """In-process ONNX Runtime with the engine's settings (one thread: the same sum order)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]
    return np.asarray(out, dtype=np.float32)


def _matrix(table: pa.Table, column: str) -> np.ndarray:
    col = table[column].combine_chunks()
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False)).reshape(len(col), -1)


def _houses(assets: Path, rows: int) -> np.ndarray:
    """`rows` distinct houses: the tutorial's 1,000, repeated and each scaled a little apart."""
    base = _matrix(read_table_file(assets / "data" / "xtest-1k.arrow")[0], "tensor")
    tiled = np.resize(base, (rows, base.shape[1]))
    scale = np.linspace(0.9, 1.1, rows, dtype=np.float32)[:, None]
    return (tiled * scale).astype(np.float32)


def _tensor_table(x: np.ndarray) -> pa.Table:
    values = pa.array(x.reshape(-1), pa.float32())
    return pa.table({"tensor": pa.FixedSizeListArray.from_arrays(values, x.shape[1])})


def _assert_clean(err: hotswap.HotswapError, *needles: str) -> None:
    """The server's own words, with no gRPC internals attached."""
    text = str(err)
    for needle in needles:
        assert needle in text, (needle, text)
    for internal in ("Traceback", "_InactiveRpcError", "StatusCode.", "debug_error_string"):
        assert internal not in text, text
    assert err.__cause__ is None
    assert err.__context__ is None or err.__suppress_context__


def _eventually(attempt: Callable[[], _T], timeout: float = 20.0) -> _T:
    """`attempt()` once it stops raising HotswapError, polling until `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return attempt()
        except hotswap.HotswapError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def _engine_requests(stack: LocalStack, name: str, pipeline: str) -> float:
    """Successful Infer calls the engine counted for `pipeline` (from its Prometheus page)."""
    url = f"http://{stack.metrics_address(name)}/metrics"
    with urllib.request.urlopen(url, timeout=5) as page:
        text = page.read().decode()
    total = 0.0
    for line in text.splitlines():
        labels = ('code="OK"', f'pipeline="{pipeline}"')
        if line.startswith("hotswap_engine_requests_total{") and all(x in line for x in labels):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- typed errors -------------------------------------------------------------------------------


def test_unknown_names_are_entity_not_found(wl: hotswap.Client) -> None:
    with pytest.raises(hotswap.EntityNotFoundError) as pipeline:
        wl.get_pipeline("no-such-pipeline")
    _assert_clean(pipeline.value, "no-such-pipeline")
    with pytest.raises(hotswap.EntityNotFoundError) as model:
        wl.get_model("no-such-model")
    _assert_clean(model.value, "no-such-model")
    with pytest.raises(hotswap.EntityNotFoundError) as workspace:
        wl.get_workspace("no-such-workspace")
    _assert_clean(workspace.value, "no-such-workspace")


def test_a_taken_workspace_name_is_entity_exists(wl: hotswap.Client) -> None:
    name = wl.get_current_workspace().name()
    with pytest.raises(hotswap.EntityExistsError) as info:
        wl.create_workspace(name)
    _assert_clean(info.value, name, "already exists")


def test_bad_onnx_is_invalid_input(wl: hotswap.Client, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"these bytes are not an ONNX model")
    with pytest.raises(hotswap.InvalidInputError) as info:
        wl.upload_model("bad", bad)
    _assert_clean(info.value, "ONNX")
    assert "bad" not in [m.name() for m in wl.list_models()]


def test_the_wrong_width_is_invalid_input(wl: hotswap.Client, assets: Path) -> None:
    pipeline = _rf(wl, assets)
    narrow = pd.DataFrame({"tensor": [[1.0] * 17, [2.0] * 17]})
    with pytest.raises(hotswap.InvalidInputError) as info:
        pipeline.infer(narrow)
    _assert_clean(info.value, "18", "17")
    # The engine is unharmed: the right width still serves.
    assert len(pipeline.infer(pd.DataFrame({"tensor": [[1.0] * 18]}))) == 1


def test_an_undeployed_pipeline_is_a_deployment_error(wl: hotswap.Client, assets: Path) -> None:
    never = wl.build_pipeline("never-deployed")
    table = _tensor_table(_houses(assets, 2))
    with pytest.raises(hotswap.DeploymentError) as infer:
        never.infer(table)
    _assert_clean(infer.value, "'never-deployed'", "not deployed")
    with pytest.raises(hotswap.DeploymentError) as endpoints:
        never.endpoints()
    _assert_clean(endpoints.value, "'never-deployed'", "not deployed")

    pipeline = _rf(wl, assets)
    pipeline.undeploy()
    with pytest.raises(hotswap.DeploymentError) as undeployed:
        pipeline.infer(table)
    _assert_clean(undeployed.value, "'p'", "not deployed")


def test_an_unreachable_control_plane_says_how_to_start_one(tmp_path: Path) -> None:
    # A real port that was just listening and is now closed.
    with LocalStack(tmp_path / "gone", engines=0) as gone:
        address = gone.control_address
    with pytest.raises(hotswap.UnavailableError) as info:
        hotswap.Client(address).list_workspaces()
    _assert_clean(info.value, address, "hotswap up")


def test_inputs_the_sdk_refuses_before_calling(wl: hotswap.Client, assets: Path) -> None:
    pipeline = _rf(wl, assets)
    with pytest.raises(hotswap.InvalidInputError, match="infer_from_file"):
        pipeline.infer("houses.df.json")
    with pytest.raises(hotswap.InvalidInputError, match="batch_rows"):
        pipeline.infer(_tensor_table(_houses(assets, 1)), batch_rows=0)
    with pytest.raises(hotswap.InvalidInputError, match="only ONNX"):
        wl.upload_model("m", assets / "models" / "rf_model.onnx", framework="pytorch")


def test_the_default_address_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOTSWAP_ADDRESS", "10.1.2.3:4")
    assert hotswap.Client().address == "10.1.2.3:4"
    monkeypatch.delenv("HOTSWAP_ADDRESS")
    assert hotswap.Client().address == "localhost:50051"
    assert hotswap.Client("h:1").address == "h:1"


# --- batching -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pandas", "arrow"])
def test_large_inputs_are_sent_in_batches_and_joined_in_order(
    stack: LocalStack, wl: hotswap.Client, assets: Path, kind: str
) -> None:
    pipeline = _rf(wl, assets)
    x = _houses(assets, 2500)
    expected = _reference(assets / "models" / "rf_model.onnx", x)
    before = _engine_requests(stack, "engine-1", "p")

    if kind == "pandas":
        df = pd.DataFrame({"k": np.arange(2500), "tensor": list(x)})
        out = pipeline.infer(df, batch_rows=1000)
        assert isinstance(out, pd.DataFrame) and len(out) == 2500
        assert out["in.k"].tolist() == list(range(2500))
        got = np.asarray(out["out.variable"].tolist(), dtype=np.float32)
        assert out.attrs["hotswap.pipeline_version"] == 1
    else:
        table = _tensor_table(x).append_column("k", pa.array(range(2500), pa.int64()))
        out_table = pipeline.infer(table, batch_rows=1000)
        assert isinstance(out_table, pa.Table) and out_table.num_rows == 2500
        assert out_table["in.k"].to_pylist() == list(range(2500))
        got = _matrix(out_table, "out.variable")
        assert (out_table.schema.metadata or {}).get(b"hotswap.pipeline_version") == b"1"

    np.testing.assert_array_equal(got, expected)
    # 1,000 + 1,000 + 500 rows: three requests reached the engine.
    assert _engine_requests(stack, "engine-1", "p") - before == 3
    served = pipeline.last_served()
    assert served is not None and served.pipeline_version == 1


# --- balancing, failover, timeouts (each on a stack of its own: they hurt engines) --------------


@pytest.fixture
def two_engines(tmp_path: Path) -> Iterator[LocalStack]:
    with LocalStack(tmp_path / "stack", engines=2) as running:
        yield running


def test_two_replicas_are_used_in_turn(two_engines: LocalStack, assets: Path) -> None:
    with hotswap.Client(two_engines.control_address) as client:
        pipeline = _rf(client, assets, replicas=2)
        houses = _tensor_table(_houses(assets, 3))
        engines = []
        for _ in range(6):
            pipeline.infer(houses)
            served = pipeline.last_served()
            assert served is not None
            engines.append(served.engine)
    assert set(engines) == set(two_engines.engine_addresses)
    # Round-robin: never the same engine twice in a row.
    assert all(a != b for a, b in itertools.pairwise(engines))


def test_a_killed_engine_is_skipped_after_one_retry(two_engines: LocalStack, assets: Path) -> None:
    with hotswap.Client(two_engines.control_address) as client:
        pipeline = _rf(client, assets, replicas=2)
        x = _houses(assets, 5)
        expected = _reference(assets / "models" / "rf_model.onnx", x)
        houses = _tensor_table(x)
        victim, survivor = two_engines.engine_names
        assert sorted(pipeline.endpoints()) == sorted(two_engines.engine_addresses)
        # Round-robin over the cached pair: once the survivor has answered, the next call goes
        # to the victim first.
        for _ in range(2):
            pipeline.infer(houses)
            served = pipeline.last_served()
            assert served is not None
            if served.engine == two_engines.address_of(survivor):
                break
        else:
            raise AssertionError("the survivor never served")

        two_engines.kill(victim, signal.SIGKILL)
        # No waiting for the control plane to notice: the SDK's cached list still names the dead
        # engine, and every call must succeed anyway (refresh, then retry on the other).
        for _ in range(4):
            out = pipeline.infer(houses)
            np.testing.assert_array_equal(_matrix(out, "out.variable"), expected)
            served = pipeline.last_served()
            assert served is not None
            assert served.engine == two_engines.address_of(survivor)

        # With every engine gone the error is typed and says where it went.
        two_engines.kill(survivor, signal.SIGKILL)
        with pytest.raises(hotswap.UnavailableError) as info:
            pipeline.infer(houses)
        _assert_clean(info.value)
        assert "engine" in str(info.value)
        for address in two_engines.engine_addresses:
            assert str(info.value).count(address) <= 1, info.value  # named once, if at all


@pytest.fixture
def one_engine(tmp_path: Path) -> Iterator[LocalStack]:
    with LocalStack(tmp_path / "stack", engines=1) as running:
        yield running


def test_a_frozen_engine_times_out_with_advice(one_engine: LocalStack, assets: Path) -> None:
    with hotswap.Client(one_engine.control_address) as client:
        pipeline = _rf(client, assets)
        houses = _tensor_table(_houses(assets, 2))
        pipeline.infer(houses)
        (engine,) = one_engine.engine_names
        one_engine.kill(engine, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(hotswap.InferenceTimeoutError) as info:
                pipeline.infer(houses, timeout=1)
            assert time.monotonic() - started < 5
        finally:
            one_engine.kill(engine, signal.SIGCONT)
        err = info.value
        assert isinstance(err, TimeoutError)
        _assert_clean(err, "'p'", "1 s", one_engine.address_of(engine))
        assert "timeout=30" in str(err) and "replica_count" in str(err)
        # Thawed, it serves again.
        out = _eventually(lambda: pipeline.infer(houses, timeout=5))
        assert out.num_rows == 2


# --- uploads ------------------------------------------------------------------------------------


def _wide_model(path: Path, width: int = 40_000) -> None:
    """y = mean(x @ W) over an 18 x `width` random W: ~2.9 MB, every weight used."""
    weights = np.random.default_rng(7).standard_normal((18, width)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("ReduceMean", ["h"], ["y"], axes=[1], keepdims=1),
        ],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 18])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])],
        initializer=[onnx.numpy_helper.from_array(weights, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def test_a_large_model_uploads_in_1_mib_chunks_and_serves(
    wl: hotswap.Client, assets: Path, tmp_path: Path
) -> None:
    path = tmp_path / "wide.onnx"
    _wide_model(path)
    data = path.read_bytes()
    assert len(data) > 2 * UPLOAD_CHUNK_BYTES == 2 * 2**20

    progress: list[tuple[int, int]] = []
    model = wl.upload_model(
        "wide", path, progress=lambda sent, total: progress.append((sent, total))
    )
    # The server checked the header's sha256 and size against the bytes it received.
    assert model.sha() == hashlib.sha256(data).hexdigest()
    assert model.size() == len(data)
    assert progress == [
        (2**20, len(data)),
        (2 * 2**20, len(data)),
        (len(data), len(data)),
    ]

    pipeline = wl.build_pipeline("wide").add_model_step(model).deploy()
    x = _houses(assets, 50)
    out = pipeline.infer(_tensor_table(x))
    np.testing.assert_allclose(_matrix(out, "out.y"), _reference(path, x), rtol=1e-5)
    served = pipeline.last_served()
    assert served is not None and served.models[0]["sha"] == model.sha()
