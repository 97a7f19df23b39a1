"""The SDK against a real local stack (a control plane and engines as separate processes), with
the tutorial's real models: answers equal in-process ONNX Runtime on the same input."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pyarrow as pa
import pytest

import hotswap
from hotswap.clients._convert import read_table_file
from hotswap.clients._stack import LocalStack

MODELS = {"rf": "housingmodelcontrol", "gbr": "gbrhousingchallenger", "xgb": "xgbhousingchallenger"}
_names = (f"ws{i}" for i in itertools.count())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("stack"), engines=1) as running:
        yield running


@pytest.fixture
def wl(stack: LocalStack) -> Iterator[hotswap.Client]:
    """A client in a workspace of its own, so tests sharing the stack never collide."""
    with hotswap.Client(stack.control_address) as client:
        client.set_current_workspace(client.create_workspace(next(_names)))
        yield client


def _reference(assets: Path, model: str, x: np.ndarray) -> np.ndarray:
    """In-process ONNX Runtime with the engine's settings: one thread, so that tree ensembles sum
    in the same order (more threads change the last bits of 1,000-row answers)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(assets / "models" / f"{model}_model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    out = session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]
    return np.asarray(out, dtype=np.float32)


def _xtest_1(assets: Path) -> pd.DataFrame:
    return pd.DataFrame(json.loads((assets / "data" / "xtest-1.df.json").read_text()))


def _xtest_1k(assets: Path) -> pa.Table:
    return read_table_file(assets / "data" / "xtest-1k.arrow")[0]


def _matrix(table: pa.Table, column: str = "tensor") -> np.ndarray:
    col = table[column].combine_chunks()
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False)).reshape(len(col), -1)


def _upload_all(wl: hotswap.Client, assets: Path) -> dict[str, hotswap.Model]:
    return {
        short: wl.upload_model(name, assets / "models" / f"{short}_model.onnx")
        for short, name in MODELS.items()
    }


def test_the_tutorial_matches_in_process_onnx_runtime(wl: hotswap.Client, assets: Path) -> None:
    models = _upload_all(wl, assets)
    assert models["rf"].inputs()[0].name == "float_input"
    assert models["xgb"].inputs()[0].name == "input"
    assert sorted(m.name() for m in wl.list_models()) == sorted(MODELS.values())

    pipeline = wl.build_pipeline("hotswappipeline")
    houses = _xtest_1(assets)
    one = np.asarray(houses["tensor"].tolist(), dtype=np.float32)
    thousand = _xtest_1k(assets)
    for number, short in enumerate(MODELS, start=1):
        if number == 1:
            pipeline.add_model_step(models[short])
        else:
            pipeline.replace_with_model_step(0, models[short])
        assert pipeline.deploy() is pipeline
        assert [m.name() for m in pipeline.steps()] == [MODELS[short]]

        out = pipeline.infer(houses)
        expected = _reference(assets, short, one)
        assert out.loc[0, "out.variable"] == [float(str(expected[0, 0]))]  # shortest display
        assert np.float32(out["out.variable"].tolist()[0][0]) == expected[0, 0]
        assert out.attrs["hotswap.pipeline_version"] == number
        assert out.attrs["hotswap.models"][0]["name"] == MODELS[short]

        big = pipeline.infer(thousand)
        np.testing.assert_array_equal(
            _matrix(big, "out.variable"), _reference(assets, short, _matrix(thousand))
        )
        served = pipeline.last_served()
        assert served is not None and served.pipeline_version == number
        assert served.models[0]["sha"] == models[short].sha()

    status = pipeline.status()
    assert status["status"] == "Running"
    (engine,) = status["engines"]
    assert engine["pipeline_statuses"]["pipelines"] == [
        {"id": "hotswappipeline", "status": "Running", "version": 3}
    ]
    assert engine["model_statuses"]["models"][0]["sha"] == models["xgb"].sha()
    assert [v.number() for v in pipeline.versions()] == [1, 2, 3]

    pipeline.undeploy()
    assert pipeline.status()["status"] != "Running"
    assert not pipeline.deployed()
    with pytest.raises(hotswap.DeploymentError, match="not deployed"):
        pipeline.infer(houses)


def test_the_tutorial_display_of_the_first_prediction(wl: hotswap.Client, assets: Path) -> None:
    model = wl.upload_model("housingmodelcontrol", assets / "models" / "rf_model.onnx")
    pipeline = wl.build_pipeline("p").add_model_step(model).deploy()
    out = pipeline.infer(_xtest_1(assets))
    assert out.loc[0, "out.variable"] == [718013.7]  # float32 718013.6875, shown as the tutorial


def test_pandas_round_trip_keeps_columns_order_and_dtypes(wl: hotswap.Client, assets: Path) -> None:
    model = wl.upload_model("rf", assets / "models" / "rf_model.onnx")
    pipeline = wl.build_pipeline("p").add_model_step(model).deploy()
    house = _xtest_1(assets)["tensor"][0]
    df = pd.DataFrame(
        {
            "id": np.array([1, 2], dtype=np.int64),
            "tensor": [house, house],
            "note": ["a", "b"],
            "weight": np.array([0.5, 0.1], dtype=np.float32),
        }
    )
    out = pipeline.infer(df)
    assert list(out.columns) == [
        "time", "in.id", "in.tensor", "in.note", "in.weight", "out.variable", "check_failures",
    ]  # fmt: skip
    for col in ("id", "note", "weight"):
        assert out[f"in.{col}"].dtype == df[col].dtype, col
        assert out[f"in.{col}"].tolist() == df[col].tolist()
    assert out["in.tensor"].tolist() == df["tensor"].tolist()


def test_arrow_round_trip_keeps_columns_order_and_types(wl: hotswap.Client, assets: Path) -> None:
    model = wl.upload_model("rf", assets / "models" / "rf_model.onnx")
    pipeline = wl.build_pipeline("p").add_model_step(model).deploy()
    thousand = _xtest_1k(assets)
    table = pa.table(
        {
            "k": pa.array(range(1000), pa.int16()),
            "tensor": thousand["tensor"],
            "label": pa.array([str(i) for i in range(1000)]),
        }
    )
    out = pipeline.infer(table)
    assert out.column_names == [
        "time", "in.k", "in.tensor", "in.label", "out.variable", "check_failures",
    ]  # fmt: skip
    for col in ("k", "tensor", "label"):
        assert out[f"in.{col}"].type == table[col].type
        assert out[f"in.{col}"].equals(table[col])
    # Batched into several requests, the answer is the same as in one.
    batched = pipeline.infer(table, batch_rows=300)
    assert batched.drop_columns(["time"]).equals(out.drop_columns(["time"]))


def test_dataset_leaves_column_groups_out_of_the_answer(wl: hotswap.Client, assets: Path) -> None:
    model = wl.upload_model("rf", assets / "models" / "rf_model.onnx")
    pipeline = wl.build_pipeline("p").add_model_step(model).deploy()
    thousand = _xtest_1k(assets)
    full = pipeline.infer(thousand)
    lean = pipeline.infer(thousand, dataset_exclude=["in"])
    assert lean.column_names == ["time", "out.variable", "check_failures"]
    assert lean["out.variable"].equals(full["out.variable"])
    assert lean.schema.metadata[b"hotswap.pipeline_version"] == b"1"
    only_out = pipeline.infer(_xtest_1(assets), dataset=["out"])
    assert list(only_out.columns) == ["out.variable"]
    assert only_out.loc[0, "out.variable"] == [718013.7]
    # The log keeps the inputs of a request that did not want them back.
    logged = pipeline.logs(limit=5000, arrow=True)
    assert logged.num_rows == 1 + 1000 + 1000
    assert "in.tensor" in logged.column_names and logged["in.tensor"].null_count == 0
    with pytest.raises(hotswap.InvalidInputError, match=r"'inputs'.*column groups"):
        pipeline.infer(thousand, dataset_exclude=["inputs"])


def test_infer_from_file(wl: hotswap.Client, assets: Path) -> None:
    model = wl.upload_model("rf", assets / "models" / "rf_model.onnx")
    pipeline = wl.build_pipeline("p").add_model_step(model).deploy()
    df = pipeline.infer_from_file(assets / "data" / "xtest-1.df.json")
    assert isinstance(df, pd.DataFrame) and df.loc[0, "out.variable"] == [718013.7]
    table = pipeline.infer_from_file(assets / "data" / "xtest-1k.arrow")
    assert isinstance(table, pa.Table) and table.num_rows == 1000
    as_pandas = pipeline.infer_from_file(assets / "data" / "xtest-1k.arrow", data_format="pandas")
    assert isinstance(as_pandas, pd.DataFrame) and len(as_pandas) == 1000


def test_rollback_serves_the_old_version(wl: hotswap.Client, assets: Path) -> None:
    models = _upload_all(wl, assets)
    pipeline = wl.build_pipeline("p").add_model_step(models["rf"]).deploy()
    pipeline.replace_with_model_step(0, models["gbr"]).deploy()
    houses = _xtest_1(assets)
    one = np.asarray(houses["tensor"].tolist(), dtype=np.float32)
    assert pipeline.infer(houses).attrs["hotswap.pipeline_version"] == 2

    pipeline.deploy(version=1)
    result = pipeline.last_deploy()
    assert result is not None and (result.version, result.previous) == (1, 2)
    out = pipeline.infer(houses)
    assert out.attrs["hotswap.pipeline_version"] == 1
    assert np.float32(out["out.variable"].tolist()[0][0]) == _reference(assets, "rf", one)[0, 0]
    assert [m.name() for m in pipeline.steps()] == [MODELS["rf"]]
    assert pipeline.versions().deployed == 1

    # A pipeline opened at a version deploys that version; no new version is made.
    pinned = wl.get_pipeline("p", version=2)
    pinned.deploy()
    assert pinned.infer(houses).attrs["hotswap.pipeline_version"] == 2
    assert len(pipeline.versions()) == 2


def test_a_reopened_pipeline_stages_what_is_deployed(wl: hotswap.Client, assets: Path) -> None:
    model = wl.upload_model("rf", assets / "models" / "rf_model.onnx")
    wl.build_pipeline("p").add_model_step(model).deploy()
    again = wl.build_pipeline("p")
    assert again.steps() == [model]
    assert wl.pipelines_by_name("p")[0].deployed()
    again.deploy()  # unchanged steps: redeploys version 1, makes no new version
    assert [v.number() for v in again.versions()] == [1]
    text = repr(again)
    assert "deployed          True" in text and "rf" in text
    assert "<th>steps</th><td>rf</td>" in again._repr_html_()
    assert "p" in repr(wl.list_pipelines())
    assert wl.get_current_workspace().name() in repr(wl.list_workspaces())


def test_configure_binds_another_column_name(wl: hotswap.Client, assets: Path) -> None:
    model = wl.upload_model("rf", assets / "models" / "rf_model.onnx")
    model.configure(tensor_fields=["features"])
    pipeline = wl.build_pipeline("p").add_model_step(model).deploy()
    houses = _xtest_1(assets).rename(columns={"tensor": "features"})
    assert pipeline.infer(houses).loc[0, "out.variable"] == [718013.7]


def test_errors_are_typed(wl: hotswap.Client, assets: Path, tmp_path: Path) -> None:
    with pytest.raises(hotswap.EntityExistsError, match="already exists"):
        wl.create_workspace(wl.get_current_workspace().name())
    with pytest.raises(hotswap.EntityNotFoundError):
        wl.get_pipeline("nope")
    with pytest.raises(hotswap.EntityNotFoundError):
        wl.pipelines_by_name("nope")
    with pytest.raises(hotswap.InvalidInputError, match="invalid workspace name"):
        wl.create_workspace("bad name!")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(hotswap.InvalidInputError, match="ONNX"):
        wl.upload_model("bad", bad)
    with pytest.raises(hotswap.InvalidInputError, match="not found"):
        wl.upload_model("missing", tmp_path / "missing.onnx")

    pipeline = wl.build_pipeline("p")
    with pytest.raises(hotswap.InvalidInputError, match="no steps"):
        pipeline.deploy()
    with pytest.raises(hotswap.InvalidInputError, match="no step 3"):
        pipeline.replace_with_model_step(
            3, wl.upload_model("rf", assets / "models" / "rf_model.onnx")
        )
    pipeline.add_model_step(wl.get_model("rf")).deploy()
    with pytest.raises(hotswap.InvalidInputError, match="18"):
        pipeline.infer(pd.DataFrame({"tensor": [[1.0, 2.0]]}))
    with pytest.raises(hotswap.EntityNotFoundError, match="no version 9"):
        pipeline.deploy(version=9)
    with pytest.raises(hotswap.ConcurrentDeployError):
        pipeline.deploy(expected_current_version=5)
    assert pipeline.infer(_xtest_1(assets)).attrs["hotswap.pipeline_version"] == 1


def test_two_replicas_share_the_load(tmp_path: Path, assets: Path) -> None:
    with (
        LocalStack(tmp_path / "stack2", engines=2) as stack,
        hotswap.Client(stack.control_address) as wl,
    ):
        model = wl.upload_model("rf", assets / "models" / "rf_model.onnx")
        config = hotswap.DeploymentConfigBuilder().replica_count(2).build()
        pipeline = wl.build_pipeline("p").add_model_step(model).deploy(deployment_config=config)
        status = pipeline.status()
        assert status["status"] == "Running"
        assert sorted(e["address"] for e in status["engines"]) == sorted(stack.engine_addresses)
        assert sorted(pipeline.endpoints()) == sorted(stack.engine_addresses)
        result = pipeline.last_deploy()
        assert result is not None and len(result.engines) == 2

        houses = _xtest_1(assets)
        engines = set()
        for _ in range(4):
            assert pipeline.infer(houses).loc[0, "out.variable"] == [718013.7]
            served = pipeline.last_served()
            assert served is not None
            engines.add(served.engine)
        assert engines == set(stack.engine_addresses)


def test_the_sdk_works_without_pandas(stack: LocalStack, assets: Path) -> None:
    script = f"""
import sys

class NoPandas:  # as if pandas were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "pandas":
            raise ModuleNotFoundError("No module named 'pandas'")

sys.meta_path.insert(0, NoPandas())
import pyarrow as pa
import hotswap
from hotswap.clients._convert import read_table_file
wl = hotswap.Client({stack.control_address!r})
wl.set_current_workspace(wl.create_workspace("nopandas"))
model = wl.upload_model("rf", {str(assets / "models" / "rf_model.onnx")!r})
pipeline = wl.build_pipeline("p").add_model_step(model).deploy()
houses, _ = read_table_file({str(assets / "data" / "xtest-1.df.json")!r})
out = pipeline.infer(houses)
assert out["out.variable"].to_pylist() == [[718013.6875]], out
out = pipeline.infer_from_file({str(assets / "data" / "xtest-1k.arrow")!r})
assert out.num_rows == 1000
try:
    pipeline.infer_from_file({str(assets / "data" / "xtest-1.df.json")!r})
except hotswap.InvalidInputError as err:
    assert "pip install" in str(err), err
else:
    raise AssertionError("pandas output without pandas")
assert "pandas" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=50)
