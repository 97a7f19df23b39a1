"""A hotswap cluster across hosts: the control plane, engines and a load client each on a
host of their own (network namespaces, tests/cluster/netns.py), the test as the operator."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import hotswap
from hotswap.v1 import control_pb2 as c
from tests.cluster.netns import Host, Network, skip_unless_possible

CONTROL_PORT = 50051
ENGINE_PORT = 50061
# Faster than the defaults (1 s, 5 s) so a test sees a loss in seconds; the same mechanism.
HEARTBEAT = "0.5"
LOST_AFTER = "2"
POLL = 0.05


def until(condition: Any, what: str, timeout: float = 30.0) -> float:
    """Polls `condition` until it holds; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(POLL)
    raise AssertionError(f"{what}: not within {timeout:g}s")


@dataclass
class Requests:
    """What a load client host saw: one record per request."""

    records: list[dict[str, Any]]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.records if not r["ok"]]

    def after(self, instant: float) -> list[dict[str, Any]]:
        return [r for r in self.records if r["start"] >= instant]

    def versions(self) -> set[int]:
        return {r["version"] for r in self.records if r["ok"]}


class Cluster:
    def __init__(self, network: Network, root: Path) -> None:
        self.network = network
        self.root = root
        self.control = network.add_host("control")
        self.client_host = network.add_host("client")
        self.engines: dict[str, Host] = {}

    @property
    def control_address(self) -> str:
        return f"{self.control.address}:{CONTROL_PORT}"

    def engine_address(self, name: str) -> str:
        return f"{self.engines[name].address}:{ENGINE_PORT}"

    def log(self, name: str) -> str:
        path = self.root / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def start_control(self, *extra: str) -> None:
        self.control.spawn(
            ["-m", "hotswap.control", "--listen", self.control_address,
             "--data-dir", str(self.root / "control"), "--heartbeat-interval", HEARTBEAT,
             "--lost-after", LOST_AFTER, "--prepare-timeout", "5", *extra],
            self.root / "logs" / "control.log",
        )  # fmt: skip
        until(self._control_answers, "the control plane answers")

    def _control_answers(self) -> bool:
        try:
            self.list_engines()
        except hotswap.HotswapError:
            return False
        return True

    def start_engine(self, name: str) -> None:
        host = self.engines.get(name) or self.network.add_host(name)
        self.engines[name] = host
        address = f"{host.address}:{ENGINE_PORT}"
        host.spawn(
            ["-m", "hotswap.engine", "--control", self.control_address, "--listen", address,
             "--name", name, "--cache-dir", str(self.root / "engines" / name),
             "--heartbeat-interval", HEARTBEAT, "--labels", f"host={name}"],
            self.root / "logs" / f"{name}.log",
        )  # fmt: skip
        until(lambda: self.engine_state(name) == "Connected", f"{name} connects")

    def list_engines(self) -> list[Any]:
        with hotswap.Client(self.control_address) as client:
            response = client._channels.control.list_engines(c.ListEnginesRequest(), timeout=2)
        return list(response.engines)

    def engine_state(self, name: str) -> str:
        try:
            engines = self.list_engines()
        except hotswap.HotswapError:
            return "unreachable"
        return next((e.state for e in engines if e.name == name), "unknown")

    def serving(self, workspace: str, pipeline: str) -> dict[str, int]:
        """Engine name -> the version it reports serving, for the deployment's engines."""
        with hotswap.Client(self.control_address) as client:
            status = client._channels.control.get_pipeline_status(
                c.GetPipelineStatusRequest(workspace=workspace, pipeline=pipeline)
            )
        return {e.name: e.serving_version for e in status.engines if e.status == "Running"}

    def endpoints(self, workspace: str, pipeline: str) -> list[str]:
        with hotswap.Client(self.control_address) as client:
            found = client._channels.control.get_pipeline_endpoints(
                c.GetPipelineEndpointsRequest(workspace=workspace, pipeline=pipeline)
            )
        return sorted(found.addresses)

    def load(self, workspace: str, pipeline: str, threads: int = 4) -> Load:
        return Load(self, workspace, pipeline, threads)


class Load:
    """The load client host's program, from start (its first answers) to stop."""

    def __init__(self, cluster: Cluster, workspace: str, pipeline: str, threads: int) -> None:
        self._cluster = cluster
        index = len(list(cluster.root.glob("load-*.jsonl")))
        self._out = cluster.root / f"load-{index}.jsonl"
        self._stop = cluster.root / f"load-{index}.stop"
        self._args = [cluster.control_address, workspace, pipeline, str(self._out),
                      str(self._stop), str(threads)]  # fmt: skip
        self.requests = Requests([])

    def records(self) -> Requests:
        """The requests that ended so far."""
        if not self._out.is_file():
            return Requests([])
        lines = self._out.read_text().splitlines()
        # The last line may be half written.
        return Requests([json.loads(line) for line in lines if line.endswith("}")])

    def wait_served(self, count: int, since: float = 0.0, timeout: float = 30.0) -> None:
        """Until `count` requests that started after `since` were answered."""

        def served() -> bool:
            assert self._process.poll() is None, self._cluster.log("load")
            return sum(1 for r in self.records().after(since) if r["ok"]) >= count

        until(served, f"{count} requests served", timeout)

    def __enter__(self) -> Load:
        self._process = self._cluster.client_host.spawn(
            ["-m", "tests.cluster._load", *self._args], self._cluster.root / "logs" / "load.log"
        )
        self.wait_served(20)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.touch()
        self._process.wait(timeout=60)
        self.requests = self.records()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    skip_unless_possible()
    with Network() as network:
        running = Cluster(network, tmp_path)
        running.start_control()
        yield running


class Operator:
    """The person at the keyboard: an SDK client on the operator's host, workspace `ws`,
    pipeline `p`, with the tutorial's three models uploaded."""

    def __init__(self, cluster: Cluster, assets: Path) -> None:
        self.client = hotswap.Client(cluster.control_address)
        self.client.set_current_workspace(self.client.create_workspace("ws"))
        self.models = {
            m: self.client.upload_model(m, assets / "models" / f"{m}_model.onnx")
            for m in ("rf", "gbr", "xgb")
        }
        self.pipeline = self.client.build_pipeline("p")

    def deploy(self, model: str, replicas: int) -> int:
        """Serves `model` alone on `replicas` engines; returns the version number deployed."""
        if self.pipeline.steps():
            self.pipeline.replace_with_model_step(0, self.models[model])
        else:
            self.pipeline.add_model_step(self.models[model])
        config = hotswap.DeploymentConfigBuilder().replica_count(replicas).build()
        self.pipeline.deploy(deployment_config=config)
        version = self.pipeline.deployed_version()
        assert version is not None
        return int(version.number())

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def operator(cluster: Cluster, assets: Path) -> Iterator[Operator]:
    person = Operator(cluster, assets)
    yield person
    person.close()
