"""Steps of several models inside one pipeline version, on real ONNX Runtime sessions: random
splits (by weight, and sticky by a key), key splits and shadow deploys, with the tutorial's
models. Each row's answer must be exactly the chosen model's, as in-process ORT gives it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pytest

from hotswap.engine.errors import InvalidInput, PrepareError
from hotswap.engine.inference_log import InferenceLog, LogSettings
from hotswap.engine.runtime import LoadedPipeline, PipelineSpec, RuntimeOptions, StepSpec
from hotswap.engine.splits import SplitSpec
from tests.traffic_models import failing_model, narrow_model


def _step(path: Path) -> StepSpec:
    name = path.stem.removesuffix("_model")
    return StepSpec(name, "v1", hashlib.sha256(path.read_bytes()).hexdigest(), path)


@pytest.fixture
def models(assets: Path, tmp_path: Path) -> dict[str, StepSpec]:
    found = {m: _step(assets / "models" / f"{m}_model.onnx") for m in ("rf", "gbr", "xgb")}
    for name, data in (("failing", failing_model()), ("narrow", narrow_model())):
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(data)
        found[name] = _step(path)
    return found


@pytest.fixture
def x(assets: Path) -> np.ndarray:
    table = pa.ipc.open_file(assets / "data" / "xtest-1k.arrow").read_all()
    return np.asarray(table.column("tensor").combine_chunks().flatten()).reshape(-1, 18)


def _reference(step: StepSpec, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(step.path), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def _split(*splits: SplitSpec, number: int = 1) -> LoadedPipeline:
    first = splits[0].models[0]
    spec = PipelineSpec("ws", "p", f"id-{number}", number, (first,), splits)
    return LoadedPipeline.build(spec, RuntimeOptions())


def _table(x: np.ndarray, **extra: pa.Array) -> pa.Table:
    tensor = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
    return pa.table({"tensor": tensor, **extra})


def _served(result: pa.RecordBatch) -> list[str]:
    return [json.loads(v[0])["name"] for v in result.column("out._model_split").to_pylist()]


def _outputs(result: pa.RecordBatch) -> np.ndarray:
    return np.asarray(result.column("out.variable").flatten()).reshape(-1, 1)


def test_random_split_holds_its_weights_and_each_row_is_its_models_answer(
    models: dict[str, StepSpec], x: np.ndarray
) -> None:
    rf, xgb = models["rf"], models["xgb"]
    loaded = _split(SplitSpec(0, "random", (rf, xgb), (70, 30)))
    references = {"rf": _reference(rf, x), "xgb": _reference(xgb, x)}
    served = []
    for i in range(2000):  # 2,000 requests: the engine draws once for each
        row = i % len(x)
        result = loaded.infer(_table(x[row : row + 1]))
        (model,) = _served(result)
        served.append(model)
        np.testing.assert_array_equal(_outputs(result), references[model][row : row + 1])
    n, p = len(served), 0.3
    sigma = np.sqrt(n * p * (1 - p))
    assert abs(served.count("xgb") - n * p) < 5 * sigma  # binomial bound, 5 sigma
    label = json.loads(result.column("out._model_split")[0].as_py()[0])
    assert set(label) == {"name", "version", "sha"}  # Wallaroo's shape
    # A request of many rows goes to one model whole (each model is timed on whole
    # requests, so a rollout compares like with like).
    whole = _served(loaded.infer(_table(x)))
    assert len(set(whole)) == 1 and len(whole) == len(x)
    # Each model counted what it served: requests and rows add up.
    counts = {m.model_name: snap for _, _, m, snap in loaded.traffic()}
    assert counts["rf"][0] + counts["xgb"][0] == n + 1
    assert counts["rf"][1] + counts["xgb"][1] == n + len(x)
    assert counts["rf"][2] == counts["xgb"][2] == 0


def test_a_hash_key_makes_rows_sticky_across_requests(
    models: dict[str, StepSpec], x: np.ndarray
) -> None:
    loaded = _split(SplitSpec(0, "random", (models["rf"], models["gbr"]), (50, 50), "user"))
    users = pa.array([f"user-{i % 400}" for i in range(1000)])
    first = _served(loaded.infer(_table(x, user=users)))
    by_user: dict[str, str] = {}
    for user, model in zip(users.to_pylist(), first, strict=True):
        assert by_user.setdefault(user, model) == model  # same key, same model in a request
    # Later requests, in another order and other row groupings, agree for every key.
    order = np.random.default_rng(1).permutation(1000)
    for part in np.array_split(order, 7):
        again = _served(loaded.infer(_table(x[part], user=users.take(pa.array(part)))))
        assert again == [by_user[users[int(i)].as_py()] for i in part]
    # And the keys still spread by the weights (400 keys, p = 0.5).
    share = sum(m == "gbr" for m in by_user.values())
    assert abs(share - 200) < 5 * np.sqrt(400 * 0.25)
    # Integer keys work too, through the fast path's numpy columns.
    ids = loaded.infer_arrays({"tensor": x[:50], "user": np.arange(50) % 5})
    assert len(set(map(str, ids.batch().column("out._model_split").to_pylist()))) <= 5


def test_a_key_split_routes_by_value(models: dict[str, StepSpec], x: np.ndarray) -> None:
    rf, gbr, xgb = models["rf"], models["gbr"], models["xgb"]
    loaded = _split(
        SplitSpec(0, "key", (rf, gbr, xgb, xgb), (), "card", ("gold", "black", "platinum"))
    )
    cards = pa.array(["gold", "black", "basic", "gold", "none", "platinum"])
    result = loaded.infer(_table(x[:6], card=cards))
    assert _served(result) == ["gbr", "xgb", "rf", "gbr", "rf", "xgb"]  # two values, one model
    expected = [_reference({"rf": rf, "gbr": gbr, "xgb": xgb}[m], x[i : i + 1])[0]
                for i, m in enumerate(_served(result))]  # fmt: skip
    np.testing.assert_array_equal(_outputs(result), np.array(expected))


def test_a_bad_or_missing_key_column_is_the_callers_error(
    models: dict[str, StepSpec], x: np.ndarray
) -> None:
    loaded = _split(SplitSpec(0, "key", (models["rf"], models["gbr"]), (), "card", ("gold",)))
    with pytest.raises(InvalidInput, match="splits rows by column 'card': the request has no"):
        loaded.infer(_table(x[:2]))
    with pytest.raises(InvalidInput, match="it is double; use a string or integer column"):
        loaded.infer(_table(x[:2], card=pa.array([1.5, 2.5])))
    with pytest.raises(InvalidInput, match="nulls"):
        loaded.infer(_table(x[:2], card=pa.array(["gold", None])))
    tensor = pa.FixedSizeListArray.from_arrays(pa.array(x[:2].ravel()), 18)
    twice = pa.Table.from_arrays(
        [tensor, pa.array(["gold", "x"]), pa.array(["gold", "x"])], ["tensor", "card", "card"]
    )
    with pytest.raises(InvalidInput, match="2 columns named 'card'"):
        loaded.infer(twice)


def test_models_that_cannot_share_a_step_fail_the_prepare(
    models: dict[str, StepSpec], x: np.ndarray
) -> None:
    with pytest.raises(PrepareError, match="model 'narrow' input 'x'"):
        _split(SplitSpec(0, "random", (models["rf"], models["narrow"]), (1, 1)))
    with pytest.raises(PrepareError, match="names a model twice"):
        _split(SplitSpec(0, "random", (models["rf"], models["rf"]), (1, 1)))
    # Weights near the float limit do not overflow into sending every row one way.
    huge = _split(SplitSpec(0, "random", (models["rf"], models["gbr"]), (1e308, 1e308)))
    assert {m for _ in range(200) for m in _served(huge.infer(_table(x[:1])))} == {"rf", "gbr"}
    for step in (1, -1):  # a split of a step the version does not have
        spec = PipelineSpec("ws", "p", "id", 1, (models["rf"],), (
            SplitSpec(step, "random", (models["rf"], models["gbr"]), (1, 1)),))  # fmt: skip
        with pytest.raises(PrepareError, match=f"names step {step} of a 1-step"):
            LoadedPipeline.build(spec, RuntimeOptions())
    with pytest.raises(PrepareError, match="one weight >= 0 per model"):
        _split(SplitSpec(0, "random", (models["rf"], models["gbr"]), (1,)))


def test_shadows_answer_with_the_champion_and_log_each_challenger(
    models: dict[str, StepSpec], x: np.ndarray, tmp_path: Path
) -> None:
    rf, gbr, failing = models["rf"], models["gbr"], models["failing"]
    loaded = _split(SplitSpec(0, "shadow", (rf, gbr, failing)))
    result, shadows = loaded.infer_traced(_table(x[:20]))
    # The answer is the champion's alone, with nothing of the challengers in it.
    np.testing.assert_array_equal(_outputs(result), _reference(rf, x[:20]))
    assert result.schema.names == ["time", "in.tensor", "out.variable", "check_failures"]
    assert shadows is not None
    log = InferenceLog(LogSettings(tmp_path / "logs"), "engine-1")
    log.append(loaded, result, 1000, 100, "", shadows)
    rows = log.query("ws", "p", 100)
    assert rows is not None
    gbr_out = np.asarray(rows.column("out_gbr.variable").combine_chunks().flatten())
    # Newest first: the log reverses the rows.
    np.testing.assert_array_equal(gbr_out[::-1], _reference(gbr, x[:20]).ravel())
    # The failing challenger failed in the log, not in the answer.
    assert rows.column("out_failing.variable").null_count == 20
    errors = json.loads(rows.column("metadata.shadow_errors")[0].as_py())
    assert list(errors) == ["failing"] and "Gather" in errors["failing"]
    elapsed = json.loads(rows.column("metadata.shadow_elapsed")[0].as_py())
    assert set(elapsed) == {"gbr", "failing"} and all(ns > 0 for ns in elapsed.values())
    counts = {m.model_name: snap for _, _, m, snap in loaded.traffic()}
    assert counts["gbr"][:3] == (1, 20, 0) and counts["failing"][:3] == (1, 20, 1)
    # Run once: the flush after the query writes the same columns without running again.
    log.flush()
    assert {m.model_name: snap[0] for _, _, m, snap in loaded.traffic()}["gbr"] == 1


def test_shadows_of_many_requests_run_together_and_failures_stay_with_their_requests(
    models: dict[str, StepSpec], x: np.ndarray, tmp_path: Path
) -> None:
    rf, gbr, failing = models["rf"], models["gbr"], models["failing"]
    loaded = _split(SplitSpec(0, "shadow", (rf, gbr, failing)))
    log = InferenceLog(LogSettings(tmp_path / "logs"), "engine-1")
    zeros = np.zeros((3, 18), np.float32)  # what the failing model takes without failing
    batches = [x[:5], zeros, x[5:9], zeros[:1]]
    for batch in batches:
        # The fast path's arrays, as a real request's: one log run of one shape.
        inferred = loaded.infer_arrays({"tensor": batch})
        log.append(loaded, inferred, 1000, 100, "", inferred.shadows)
    log.flush()
    rows = log.query("ws", "p", 100)
    assert rows is not None and rows.num_rows == 13
    rows = rows.take(pa.array(range(12, -1, -1)))  # oldest first, as sent
    every = np.concatenate(batches)
    gbr_out = np.asarray(rows.column("out_gbr.variable").combine_chunks().flatten())
    np.testing.assert_array_equal(gbr_out, _reference(gbr, every).ravel())
    failed = [v is None for v in rows.column("out_failing.variable").to_pylist()]
    assert failed == [True] * 5 + [False] * 3 + [True] * 4 + [False]
    errors = [e is not None for e in rows.column("metadata.shadow_errors").to_pylist()]
    assert errors == failed
    counts = {m.model_name: snap for _, _, m, snap in loaded.traffic()}
    assert counts["gbr"][:3] == (4, 13, 0)  # one batch of four requests
    assert counts["failing"][:3] == (4, 13, 2)  # retried one by one: two failed


def test_the_warm_up_is_not_counted_as_traffic(models: dict[str, StepSpec], x: np.ndarray) -> None:
    loaded = _split(SplitSpec(0, "random", (models["rf"], models["xgb"]), (1, 0)))
    assert loaded.warmup_ms > 0
    assert all(snap == (0, 0, 0, 0) for *_, snap in loaded.traffic())
    assert set(_served(loaded.infer(_table(x[:50])))) == {"rf"}  # weight 0: never chosen
