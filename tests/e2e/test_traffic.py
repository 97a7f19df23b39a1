"""Traffic management on a real stack (control plane and engine processes, real ONNX Runtime),
through the SDK as a user drives it: A/B splits, key stickiness, shadow deploys, weights
changed under load, and rollouts that complete, roll back by themselves, and survive a killed
control plane."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pytest

import hotswap
from hotswap.clients._stack import LocalStack
from hotswap.oip import grpc_service_pb2 as oip
from hotswap.oip import grpc_service_pb2_grpc as oip_grpc
from hotswap.v1 import control_pb2 as c
from tests.traffic_models import failing_model, slow_model

MODELS = ("rf", "gbr", "xgb")


@pytest.fixture
def wl(stack: LocalStack) -> Iterator[hotswap.Client]:
    with hotswap.Client(stack.control_address) as client:
        client.set_current_workspace(client.create_workspace("traffic"))
        yield client


@pytest.fixture
def models(wl: hotswap.Client, assets: Path, tmp_path: Path) -> dict[str, hotswap.Model]:
    found = {m: wl.upload_model(m, assets / "models" / f"{m}_model.onnx") for m in MODELS}
    for name, data in (("failing", failing_model()), ("slow", slow_model())):
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(data)
        found[name] = wl.upload_model(name, path)
    return found


@pytest.fixture
def x(assets: Path) -> np.ndarray:
    table = pa.ipc.open_file(assets / "data" / "xtest-1k.arrow").read_all()
    return np.asarray(table.column("tensor").combine_chunks().flatten()).reshape(-1, 18)


def _table(x: np.ndarray, **extra: object) -> pa.Table:
    tensor = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
    return pa.table({"tensor": tensor, **{k: pa.array(v) for k, v in extra.items()}})


def _reference(assets: Path, model: str, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(assets / "models" / f"{model}_model.onnx"), options)
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def _served(result: pa.Table) -> list[str]:
    return [json.loads(v[0])["name"] for v in result.column("out._model_split").to_pylist()]


def _value(result: pa.Table) -> np.ndarray:
    return np.asarray(result.column("out.variable").combine_chunks().flatten())


@dataclass
class Load:
    """1-row requests from a client of its own until stopped: what was answered by whom."""

    address: str
    pipeline: str
    row: pa.Table
    served: Counter[tuple[int, str]] = field(default_factory=Counter)  # (version, model)
    failures: list[tuple[float, str]] = field(default_factory=list)  # (when, what)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Load:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        with hotswap.Client(self.address) as client:
            client.set_current_workspace("traffic")
            pipeline = client.get_pipeline(self.pipeline)
            while not self._stop.is_set():
                try:
                    result = pipeline.infer(self.row, timeout=10)
                except hotswap.HotswapError as exc:
                    self.failures.append((time.monotonic(), str(exc)))
                    continue
                served = pipeline.last_served()
                assert served is not None
                names = (
                    _served(result)
                    if "out._model_split" in result.column_names
                    else [served.models[0]["name"]]
                )
                self.served[(served.pipeline_version, names[0])] += 1

    def count(self, version: int) -> int:
        """Answers `version` gave so far."""
        return sum(n for (v, _), n in list(self.served.items()) if v == version)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=30)


def _until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def test_an_ab_split_holds_its_weights_and_each_answer_is_its_models(
    wl: hotswap.Client, models: dict[str, hotswap.Model], assets: Path, x: np.ndarray
) -> None:
    pipeline = wl.build_pipeline("ab")
    pipeline.add_random_split([(80, models["rf"]), (20, models["xgb"])]).deploy()
    chosen = []
    for i in range(400):  # 400 separate requests: the engine decides each
        result = pipeline.infer(_table(x[i : i + 1]))
        (model,) = _served(result)
        chosen.append(model)
        np.testing.assert_array_equal(_value(result), _reference(assets, model, x[i : i + 1])[0])
    counts = Counter(chosen)
    assert set(counts) == {"rf", "xgb"}
    assert abs(counts["xgb"] - 80) < 5 * np.sqrt(400 * 0.2 * 0.8)  # binomial, 5 sigma
    # The step reads back as a split, and the logs attribute each row to its model.
    (step,) = pipeline.deployed_version().steps()  # type: ignore[union-attr]
    assert isinstance(step, hotswap.Split) and step.weights == (80.0, 20.0)
    _until(lambda: len(pipeline.logs(limit=400, arrow=True)) == 400)
    logged = cast(pa.Table, pipeline.logs(limit=400, arrow=True, dataset=["metadata"]))
    assert Counter(_served(logged)) == counts
    last = [json.loads(m)["model_name"] for m in logged.column("metadata.last_model").to_pylist()]
    assert last == _served(logged)  # the metadata names the model that served the row
    # The Open Inference Protocol's answers name the model too, as a BYTES output.
    channel = grpc.insecure_channel(pipeline.endpoints()[0])
    stub: Any = oip_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[arg-type]
    for i in range(20):
        row = x[i : i + 1].astype(np.float32)
        answer = stub.ModelInfer(
            oip.ModelInferRequest(
                model_name="ab",
                inputs=[
                    oip.ModelInferRequest.InferInputTensor(
                        name="tensor", datatype="FP32", shape=[1, 18]
                    )
                ],
                raw_input_contents=[row.tobytes()],
            )
        )
        names = [o.name for o in answer.outputs]
        assert names == ["variable", "_model_split"]
        assert list(answer.outputs[1].shape) == [1, 1] and answer.outputs[1].datatype == "BYTES"
        label = answer.raw_output_contents[1][4:]  # BYTES: a 4-byte length, then the text
        model = json.loads(label)["name"]
        value = np.frombuffer(answer.raw_output_contents[0], np.float32)
        np.testing.assert_array_equal(value, _reference(assets, model, row).ravel())


def test_rows_with_the_same_key_go_to_the_same_model_across_requests(
    wl: hotswap.Client, models: dict[str, hotswap.Model], x: np.ndarray
) -> None:
    pipeline = wl.build_pipeline("sticky")
    pipeline.add_random_split([(1, models["rf"]), (1, models["gbr"])], hash_key="user").deploy()
    users = [f"u{i % 60}" for i in range(300)]
    first = _served(pipeline.infer(_table(x[:300], user=users)))
    by_user = dict(zip(users, first, strict=True))
    assert len(set(by_user.values())) == 2
    for start in range(0, 300, 37):  # other requests, other groupings: the same choices
        part = slice(start, start + 37)
        again = _served(pipeline.infer(_table(x[:300][part], user=users[part])))
        assert again == [by_user[u] for u in users[part]]
    # A key split sends each value where it says.
    pipeline = wl.build_pipeline("keyed")
    pipeline.add_key_split(
        models["rf"], "card", {"gold": models["xgb"], "black": models["xgb"]}
    ).deploy()
    result = pipeline.infer(_table(x[:4], card=["gold", "basic", "black", "gold"]))
    assert _served(result) == ["xgb", "rf", "xgb", "xgb"]


def test_shadows_never_hold_up_or_fail_a_request_and_their_outputs_are_logged(
    wl: hotswap.Client,
    models: dict[str, hotswap.Model],
    assets: Path,
    x: np.ndarray,
    stack: LocalStack,
) -> None:
    pipeline = wl.build_pipeline("shadowed")
    pipeline.add_shadow_deploy(models["rf"], [models["gbr"], models["failing"]]).deploy()
    rf = _reference(assets, "rf", x[:50])
    for i in range(50):
        result = pipeline.infer(_table(x[i : i + 1]))  # the failing challenger never shows
        np.testing.assert_array_equal(_value(result), rf[i])
        assert not any(c.startswith("out_") for c in result.column_names)
    _until(lambda: len(pipeline.logs(limit=50, arrow=True)) == 50)
    logs = cast(pa.Table, pipeline.logs(limit=50, arrow=True, dataset=["metadata"]))
    gbr = np.asarray(logs.column("out_gbr.variable").combine_chunks().flatten())
    np.testing.assert_array_equal(gbr[::-1], _reference(assets, "gbr", x[:50]).ravel())
    assert logs.column("out_failing.variable").null_count == 50
    errors = [json.loads(e) for e in logs.column("metadata.shadow_errors").to_pylist()]
    assert all(list(e) == ["failing"] for e in errors)
    elapsed = [json.loads(e) for e in logs.column("metadata.shadow_elapsed").to_pylist()]
    assert all(v["gbr"] > 0 for v in elapsed)
    # The engine's metrics count each challenger: gbr ran 50 times cleanly, failing failed 50.
    text = (
        urllib.request.urlopen(
            f"http://{stack.metrics_address(stack.engine_names[0])}/metrics", timeout=5
        )
        .read()
        .decode()
    )
    assert _sample(text, "hotswap_engine_model_errors_total", model="failing") == 50
    assert _sample(text, "hotswap_engine_model_requests_total", model="gbr") == 50
    assert _sample(text, "hotswap_engine_model_errors_total", model="gbr") == 0


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {labels} in the metrics")


def test_no_request_is_lost_while_weights_change_under_load(
    wl: hotswap.Client, models: dict[str, hotswap.Model], stack: LocalStack, x: np.ndarray
) -> None:
    pipeline = wl.build_pipeline("weights")
    pipeline.add_random_split([(100, models["rf"]), (0, models["gbr"])]).deploy()
    with Load(stack.control_address, "weights", _table(x[:1])) as load:
        _until(lambda: sum(load.served.values()) > 20)
        for weight in (10, 50, 90, 100, 0, 30):
            pipeline.replace_with_random_split(
                0, [(100 - weight, models["rf"]), (weight, models["gbr"])]
            ).deploy()
            deployed = pipeline.deployed_version().number()  # type: ignore[union-attr]
            before = load.count(deployed)
            _until(lambda: load.count(deployed) > before + 10)  # noqa: B023 (called at once)
    assert load.failures == []
    # The weights held per version: none of gbr at weight 0, none of rf at 100.
    versions = {v.number(): v for v in pipeline.versions()}
    for (version, model), _ in load.served.items():
        step = versions[version].steps()[0]
        assert isinstance(step, hotswap.Split)
        weights = dict(zip((m.name() for m in step.models), step.weights, strict=True))
        assert weights[model] > 0


def _notes(pipeline: hotswap.Pipeline) -> list[str]:
    return [s["note"] for s in reversed(pipeline.swaps(50)) if s["note"]]


def test_a_rollout_to_a_failing_model_rolls_back_by_itself(
    wl: hotswap.Client, models: dict[str, hotswap.Model], stack: LocalStack, x: np.ndarray
) -> None:
    pipeline = wl.build_pipeline("to-failing").add_model_step(models["rf"]).deploy()
    baseline = pipeline.deployed_version().number()  # type: ignore[union-attr]
    with Load(stack.control_address, "to-failing", _table(x[:1])) as load:
        _until(lambda: sum(load.served.values()) > 10)
        rollout = pipeline.rollout(
            models["failing"], steps=(20, 50, 100), step_seconds=30, min_requests=5
        )
        assert pipeline.status()["rollout"]["state"] == "running"  # status() shows it
        rollout.wait(60)
        rolled_back_at = time.monotonic()
        _until(lambda: load.count(baseline) > 200)
    assert rollout.state() == "rolled_back", rollout
    assert "error rate" in rollout.reason()
    assert pipeline.deployed_version().number() == baseline  # type: ignore[union-attr]
    (step,) = rollout.steps()
    assert step["outcome"] == "failed" and step["challenger"]["errors"] >= 1
    # Requests the failing model served failed; none after the rollback did.
    assert load.failures and all(when < rolled_back_at for when, _ in load.failures)
    assert all("Gather" in what or "rejected" in what for _, what in load.failures)
    notes = _notes(pipeline)
    assert notes[0].endswith("step 1 of 3, 20% to failing")
    assert f"rolled back to version {baseline}" in notes[-1] and "error rate" in notes[-1]
    assert "rollout" not in pipeline.status()


def test_a_rollout_to_a_slow_model_rolls_back_on_latency(
    wl: hotswap.Client, models: dict[str, hotswap.Model], stack: LocalStack, x: np.ndarray
) -> None:
    pipeline = wl.build_pipeline("to-slow").add_model_step(models["rf"]).deploy()
    with Load(stack.control_address, "to-slow", _table(x[:1])):
        rollout = pipeline.rollout(
            models["slow"], steps=(50, 100), step_seconds=30, min_requests=10,
            max_latency_ratio=3,
        ).wait(60)  # fmt: skip
    assert rollout.state() == "rolled_back", rollout
    assert "the champion's" in rollout.reason()
    step = rollout.steps()[0]
    assert step["challenger"]["ms_per_row"] > 3 * step["champion"]["ms_per_row"]
    assert step["challenger"]["errors"] == 0


def test_a_rollout_to_a_good_model_completes_step_by_step(
    wl: hotswap.Client, models: dict[str, hotswap.Model], stack: LocalStack, x: np.ndarray
) -> None:
    pipeline = wl.build_pipeline("to-gbr").add_model_step(models["rf"]).deploy()
    with Load(stack.control_address, "to-gbr", _table(x[:1])) as load:
        rollout = pipeline.rollout(
            models["gbr"], steps=(25, 50, 100), step_seconds=1, min_requests=10,
            max_latency_ratio=5,
        ).wait(60)  # fmt: skip
    assert rollout.state() == "completed", rollout
    assert [s["percent"] for s in rollout.steps()] == [25, 50, 100]
    assert [s["outcome"] for s in rollout.steps()] == ["passed"] * 3
    final = pipeline.deployed_version()
    assert final is not None and final.number() == rollout.final_version()
    (only,) = final.steps()
    assert isinstance(only, hotswap.Model) and only.name() == "gbr"
    assert load.failures == []
    # The challenger's share grew step by step.
    share = [
        load.served[(s["version"], "gbr")]
        / max(1, load.served[(s["version"], "gbr")] + load.served[(s["version"], "rf")])
        for s in rollout.steps()[:2]
    ]
    assert 0 < share[0] < share[1] < 1
    notes = _notes(pipeline)
    assert len(notes) == 3 and "step 1 at 25% passed: challenger 0 errors" in notes[1]
    assert notes[2].startswith(f"rollout {rollout.to_dict()['id'][:8]}: step 3 of 3, gbr alone")


@pytest.mark.slow  # restarts: `make test-slow`, which CI runs too
def test_a_rollout_resumes_after_the_control_plane_is_killed(
    wl: hotswap.Client, models: dict[str, hotswap.Model], stack: LocalStack, x: np.ndarray
) -> None:
    pipeline = wl.build_pipeline("restart").add_model_step(models["rf"]).deploy()
    with Load(stack.control_address, "restart", _table(x[:1])) as load:
        rollout = pipeline.rollout(
            models["gbr"], steps=(30, 100), step_seconds=4, min_requests=5, max_latency_ratio=5
        )
        stack.kill("control", signal.SIGKILL)
        stack.start_control()
        stack.wait_engines_connected(stack.engine_names)
        with hotswap.Client(stack.control_address) as again:
            again.set_current_workspace("traffic")
            restarted = again.get_pipeline("restart")
            resumed = restarted.rollout_status()
            assert resumed.to_dict()["id"] == rollout.to_dict()["id"]
            assert resumed.state() in ("running", "completed")
            resumed.wait(60)
            assert resumed.state() == "completed", resumed
            assert restarted.deployed_version().steps()[0].name() == "gbr"  # type: ignore[union-attr]
    assert load.failures == []


def test_a_deploy_by_someone_else_ends_a_quiet_rollout_leaving_their_version(
    wl: hotswap.Client, models: dict[str, hotswap.Model]
) -> None:
    pipeline = wl.build_pipeline("overtaken").add_model_step(models["rf"]).deploy()
    rollout = pipeline.rollout(models["gbr"], steps=(20, 100), step_seconds=60)
    # No traffic: the step waits. Someone deploys xgb meanwhile.
    pipeline.replace_with_model_step(0, models["xgb"]).deploy()
    theirs = pipeline.deployed_version().number()  # type: ignore[union-attr]
    rollout.wait(30)
    assert rollout.state() == "aborted" and "someone else" in rollout.reason()
    assert rollout.final_version() == theirs
    assert pipeline.deployed_version().number() == theirs  # type: ignore[union-attr]
    # The pipeline is free for the next rollout.
    again = pipeline.rollout(models["gbr"], steps=(100,), step_seconds=1).wait(30)
    assert again.state() == "completed"


def test_an_engine_restarting_during_a_step_rolls_the_rollout_back(
    wl: hotswap.Client, models: dict[str, hotswap.Model], stack: LocalStack
) -> None:
    pipeline = wl.build_pipeline("crashy").add_model_step(models["rf"]).deploy()
    baseline = pipeline.deployed_version().number()  # type: ignore[union-attr]
    rollout = pipeline.rollout(models["gbr"], steps=(20, 100), step_seconds=60)
    _until(lambda: bool(rollout.refresh().steps()))
    time.sleep(1.5)  # the watcher notes the engine's instance (it polls every 0.5 s)
    # A crash, as a challenger that kills engines would cause: its counts die with it.
    stack.kill("engine-1", signal.SIGKILL)
    stack.start_engine("engine-1")
    rollout.wait(60)
    assert rollout.state() == "rolled_back", rollout
    assert "engine engine-1 restarted" in rollout.reason()
    assert pipeline.deployed_version().number() == baseline  # type: ignore[union-attr]


@pytest.mark.slow  # restarts: `make test-slow`, which CI runs too
def test_an_abort_decided_while_no_engine_can_take_it_lands_after_a_restart(
    wl: hotswap.Client, models: dict[str, hotswap.Model], stack: LocalStack
) -> None:
    pipeline = wl.build_pipeline("stubborn").add_model_step(models["rf"]).deploy()
    baseline = pipeline.deployed_version().number()  # type: ignore[union-attr]
    rollout = pipeline.rollout(models["gbr"], steps=(20, 100), step_seconds=60)
    stack.kill("engine-1", signal.SIGKILL)
    # The abort cannot land with no engine: the caller gives up, the decision stays.
    with pytest.raises(hotswap.HotswapError):
        pipeline._channels.control.abort_rollout(  # a short deadline of its own
            c.AbortRolloutRequest(workspace="traffic", pipeline="stubborn", reason="ops"),
            timeout=2,
        )
    assert rollout.refresh().state() == "rolling_back"
    stack.kill("control", signal.SIGKILL)
    stack.start_control()
    stack.start_engine("engine-1")
    stack.wait_engines_connected(stack.engine_names)
    with hotswap.Client(stack.control_address) as again:
        again.set_current_workspace("traffic")
        restarted = again.get_pipeline("stubborn")
        ended = restarted.rollout_status().wait(60)
        assert ended.state() == "aborted" and "ops" in ended.reason()
        assert restarted.deployed_version().number() == baseline  # type: ignore[union-attr]
        assert ended.final_version() == baseline
