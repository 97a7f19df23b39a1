"""Graceful drain: SIGTERM to a serving engine (what Kubernetes sends when it deletes a pod)
moves its replicas to another engine by a two-phase swap before it exits, and clients going
through the SDK lose no request. Real processes, real signals, real ONNX Runtime."""

from __future__ import annotations

import json
import signal
import threading
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

import hotswap
from hotswap.clients._stack import LocalStack
from hotswap.v1 import control_pb2 as c
from tests.e2e import _api

# Slow (engines drained and stopped by signals): `make test-slow`, which CI runs too.
pytestmark = pytest.mark.slow

CLIENTS = 4


def _deploy_rf(client: hotswap.Client, assets: Path) -> hotswap.Pipeline:
    client.set_current_workspace(client.create_workspace("drain"))
    model = client.upload_model("rf", assets / "models" / "rf_model.onnx")
    config = hotswap.DeploymentConfigBuilder().replica_count(1).build()
    return client.build_pipeline("p").add_model_step(model).deploy(deployment_config=config)


def _serving_engine(stack: LocalStack) -> str:
    status = _api.control(stack.control_address).GetPipelineStatus(
        c.GetPipelineStatusRequest(workspace="drain", pipeline="p")
    )
    return str(status.engines[0].name)


class Load:
    """SDK clients in threads, each with its own Client, calling `pipeline.infer` back to
    back."""

    def __init__(self, address: str, frame: pd.DataFrame) -> None:
        self.ok: Counter[str] = Counter()  # by engine address
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._progress = threading.Condition(self._lock)
        self._threads = [
            threading.Thread(target=self._run, args=(address, frame)) for _ in range(CLIENTS)
        ]

    def _run(self, address: str, frame: pd.DataFrame) -> None:
        with hotswap.Client(address) as client:
            client.set_current_workspace("drain")
            self._loop(client.get_pipeline("p"), frame)

    def _loop(self, pipeline: hotswap.Pipeline, frame: pd.DataFrame) -> None:
        while not self._stop.is_set():
            try:
                pipeline.infer(frame, timeout=10)
                served = pipeline.last_served()
                engine = served.engine if served else "?"
            except hotswap.HotswapError as exc:
                with self._lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with self._progress:
                self.ok[engine] += 1
                self._progress.notify_all()

    def wait_for(self, engine: str, count: int, timeout: float = 30) -> None:
        """Until `count` more requests than now were served by `engine`."""
        with self._progress:
            target = self.ok[engine] + count
            assert self._progress.wait_for(lambda: self.ok[engine] >= target, timeout), (
                f"{engine} served {self.ok[engine]} of {target} requests in {timeout}s"
            )

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def test_sigterm_moves_the_replica_and_loses_no_request(
    tmp_path: Path, assets: Path, tutorial_frame: pd.DataFrame
) -> None:
    with (
        LocalStack(tmp_path / "stack", engines=2, engine_args=("--drain-timeout", "60")) as stack,
        hotswap.Client(stack.control_address) as client,
    ):
        _deploy_rf(client, assets)
        leaving = _serving_engine(stack)
        staying = next(n for n in stack.engine_names if n != leaving)
        with Load(stack.control_address, tutorial_frame.head(1)) as load:
            load.wait_for(stack.address_of(leaving), 50)
            stack.kill(leaving, signal.SIGTERM)  # returns once the process has exited
            assert stack.processes[leaving].returncode == 0
            load.wait_for(stack.address_of(staying), 50)
        assert load.errors == []
        assert _serving_engine(stack) == staying
        assert "drained: every pipeline moved to other engines" in stack.log_tail(leaving, 200)
        swaps = _api.control(stack.control_address).ListSwaps(
            c.ListSwapsRequest(workspace="drain", pipeline="p")
        )
        moved = swaps.swaps[0]
        assert (moved.kind, moved.outcome) == ("redeploy", "ok")
        assert moved.requested_by == f"control plane (draining engine {leaving})"
        assert [e.engine for e in moved.engines] == [staying]


def test_the_last_engine_serves_until_the_control_plane_says_nothing_can_move(
    tmp_path: Path, assets: Path, tutorial_frame: pd.DataFrame
) -> None:
    with (
        LocalStack(tmp_path / "stack", engines=1, engine_args=("--drain-timeout", "600")) as stack,
        hotswap.Client(stack.control_address) as client,
    ):
        pipeline = _deploy_rf(client, assets)
        assert len(pipeline.infer(tutorial_frame.head(1))) == 1
        # Far sooner than the drain timeout: the control plane's answer ends the wait.
        stack.kill("engine-1", signal.SIGTERM)
        assert stack.processes["engine-1"].returncode == 0
        assert "no other engine could take drain/p" in stack.log_tail("engine-1", 200)


@pytest.fixture
def tutorial_frame(assets: Path) -> pd.DataFrame:
    return pd.DataFrame(json.loads((assets / "data" / "xtest-1k.df.json").read_text()))


def test_sigusr1_starts_the_drain_while_the_engine_keeps_running(
    tmp_path: Path, assets: Path, tutorial_frame: pd.DataFrame
) -> None:
    """What the Kubernetes preStop hook sends before SIGTERM: the replica moves away at once,
    and no new replica comes to the engine, while it is still up."""
    with (
        LocalStack(tmp_path / "stack", engines=2) as stack,
        hotswap.Client(stack.control_address) as client,
    ):
        _deploy_rf(client, assets)
        leaving = _serving_engine(stack)
        staying = next(n for n in stack.engine_names if n != leaving)
        with Load(stack.control_address, tutorial_frame.head(1)) as load:
            load.wait_for(stack.address_of(leaving), 20)
            stack.kill(leaving, signal.SIGUSR1)
            load.wait_for(stack.address_of(staying), 50)
        assert load.errors == []
        assert _serving_engine(stack) == staying
        assert stack.processes[leaving].poll() is None  # still running: SIGTERM ends it
        engines = {e["name"]: e for e in client.list_engines()}
        assert engines[leaving]["draining"] and not engines[staying]["draining"]
        # A new deployment does not go to the draining engine, though it is the least loaded.
        model = client.upload_model("rf2", assets / "models" / "rf_model.onnx")
        other = client.build_pipeline("other").add_model_step(model).deploy()
        assert [e["name"] for e in other.status()["engines"]] == [staying]
