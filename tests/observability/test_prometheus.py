"""A real Prometheus (Debian's `prometheus`) scraping both services during swaps under load:
the requests it counts per version are the ones the clients were answered by, and every query
of the shipped Grafana dashboard returns data from it."""

from __future__ import annotations

import functools
import itertools
import json
import math
import shutil
import socket
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from hotswap.clients._stack import LocalStack
from tests._artifacts import artifacts_dir
from tests.e2e import _api
from tests.e2e.conftest import seed_models

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "hotswap.json"
PIPELINE = "housing"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Prometheus:
    """A Prometheus server scraping `targets` every second, with its data in `directory`."""

    def __init__(self, binary: str, targets: list[str], directory: Path) -> None:
        config = directory / "prometheus.yml"
        config.write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                    "scrape_configs": [
                        {"job_name": "hotswap", "static_configs": [{"targets": targets}]}
                    ],
                }
            )
        )
        self.address = f"127.0.0.1:{_free_port()}"
        self._log = (directory / "prometheus.log").open("wb")
        self._process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address={self.address}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        _api.until(self._ready, "Prometheus ready", timeout=30, interval=0.1)

    def _ready(self) -> bool:
        assert self._process.poll() is None, "prometheus exited; see prometheus.log"
        try:
            with urllib.request.urlopen(f"http://{self.address}/-/ready", timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        url = f"http://{self.address}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = json.loads(answer.read())
        assert body["status"] == "success", body
        return body["data"]["result"]  # type: ignore[no-any-return]

    def scalar(self, promql: str) -> float:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else math.nan

    def up(self) -> dict[str, float]:
        return {r["metric"]["instance"]: float(r["value"][1]) for r in self.query("up")}

    def close(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=20)
        self._log.close()


@pytest.fixture
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.skip("Debian's prometheus is not installed (make test installs it when root)")
    return found


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LocalStack]:
    with LocalStack(tmp_path / "stack", engines=1) as running:
        yield running


def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def test_prometheus_counts_what_clients_were_served_and_the_dashboard_has_data(
    stack: LocalStack, assets: Path, prometheus_binary: str, tmp_path: Path
) -> None:
    control = _api.control(stack.control_address)
    seed_models(control, assets, PIPELINE)
    versions = [_api.new_version(control, PIPELINE, m).number for m in ("rf", "gbr", "xgb")]
    _api.deploy(control, PIPELINE, versions[0])
    targets = [stack.metrics_address("control"), stack.metrics_address("engine-1")]
    prometheus = Prometheus(prometheus_binary, targets, tmp_path)
    try:
        _api.until(
            lambda: set(prometheus.up().items()) == {(t, 1.0) for t in targets},
            "both services scraped",
        )
        served: dict[int, int] = {}
        lock = threading.Lock()
        stop = threading.Event()
        body = _api.ipc_stream(_api.tensor_table(np.ones((1, 18), np.float32)))

        def load() -> None:
            engine = _api.engine(stack.engine_addresses[0])
            for _ in range(100_000):  # bounded; the test stops it far sooner
                if stop.is_set():
                    return
                answer = _api.infer(engine, PIPELINE, body)
                with lock:
                    served[answer.version] = served.get(answer.version, 0) + 1

        threads = [threading.Thread(target=load) for _ in range(2)]
        for thread in threads:
            thread.start()

        def scraped(version: int) -> float:
            ok = f'hotswap_engine_requests_total{{code="OK", version="{version}"}}'
            return prometheus.scalar(f"sum({ok})")

        # Each version serves across a few scrapes before the next swap.
        for current, following in itertools.pairwise(versions):
            seen = functools.partial(lambda v: scraped(v) >= 100, current)
            _api.until(seen, f"Prometheus to see v{current} serve")
            _api.deploy(control, PIPELINE, following)
        # Some refusals, so that the errors panel has data too.
        engine = _api.engine(stack.engine_addresses[0])
        bad = _api.ipc_stream(_api.tensor_table(np.ones((1, 17), np.float32)))
        for _ in range(3):
            with pytest.raises(grpc.RpcError):
                _api.infer(engine, PIPELINE, bad)
        _api.until(lambda: scraped(versions[-1]) >= 100, "Prometheus to see the last version")
        stop.set()
        for thread in threads:
            thread.join(timeout=20)

        # Requests per version add up: what Prometheus counts is what clients were served.
        query = 'sum by (version) (hotswap_engine_requests_total{pipeline="housing", code="OK"})'

        def by_version() -> dict[int, int]:
            return {
                int(r["metric"]["version"]): int(float(r["value"][1]))
                for r in prometheus.query(query)
            }

        _api.until(lambda: by_version() == served, f"Prometheus's counts to reach {served}")
        assert set(served) == set(versions)
        errors = 'sum(hotswap_engine_requests_total{code="INVALID_ARGUMENT"})'
        assert prometheus.scalar(errors) == 3
        deploys = 'sum(hotswap_control_deploys_total{outcome="ok"})'
        assert prometheus.scalar(deploys) == len(versions)

        # Every query of the dashboard returns data, with its variables set as Grafana would.
        empty, answers = [], {query: by_version(), errors: 3.0, deploys: len(versions)}
        for title, expr in _dashboard_queries():
            promql = expr.replace("$workspace", _api.WS).replace("$pipeline", PIPELINE)
            result = prometheus.query(promql)
            values = [float(r["value"][1]) for r in result]
            answers[promql] = [{**r["metric"], "value": r["value"][1]} for r in result]
            if not values or not any(math.isfinite(v) for v in values):
                empty.append(f"{title}: {promql} -> {result}")
        out = artifacts_dir("prometheus") / "queries.json"
        out.write_text(json.dumps({"served": served, "answers": answers}, indent=1, default=str))
        assert empty == [], f"queries without data (all answers in {out})"
    finally:
        prometheus.close()
