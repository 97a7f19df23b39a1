"""One engine on several processes (`--processes`): they share the port, every one of them
serves, each swap is answered only when all have switched, tokens are checked by each, and a
worker that dies stops the engine instead of leaving it half there."""

from __future__ import annotations

import collections
import json
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

import hotswap
from hotswap.clients._rpc import Security
from hotswap.clients._stack import LocalStack
from hotswap.v1 import engine_pb2 as e
from hotswap.v1 import engine_pb2_grpc as eg
from tests.e2e import _api

X = np.ones((1, 18), np.float32)
TOKEN = "alice-token-0123456789abcdef"
ENGINE = "engine-token-0123456789abcdef"


def _fresh_call(address: str, token: str | None = None) -> Any:
    """One request on a new connection (a connection the kernel may give any process)."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(address, options=options) as channel:
        request = e.InferRequest(pipeline="p", arrow=_api.ipc_stream(_api.tensor_table(X)))
        stub: Any = eg.EngineStub(channel)  # type: ignore[arg-type]
        return stub.Infer(request, metadata=metadata, timeout=10)


def _workers(stack: LocalStack) -> list[psutil.Process]:
    return psutil.Process(stack.processes["engine-1"].pid).children()


@pytest.fixture
def two(tmp_path: Path) -> Iterator[LocalStack]:
    with LocalStack(tmp_path / "stack", engine_args=("--processes", "2")) as stack:
        yield stack


def test_every_process_serves_and_each_swap_is_read_everywhere(
    two: LocalStack, assets: Path
) -> None:
    assert len(_workers(two)) == 1
    with hotswap.Client(two.control_address) as client:
        client.set_current_workspace(client.get_workspace("ws", create_if_not_exist=True))
        models = {
            m: client.upload_model(m, assets / "models" / f"{m}_model.onnx")
            for m in ("rf", "gbr", "xgb")
        }
        pipeline = client.build_pipeline("p").add_model_step(models["rf"]).deploy()
        address = two.engine_addresses[0]
        for number, model in ((2, "gbr"), (3, "xgb"), (4, "rf")):
            pipeline.replace_with_model_step(0, models[model]).deploy()
            # Read-your-writes across processes: once deploy() returned, any connection,
            # whichever process it reached, is served by the new version.
            answers = [_fresh_call(address) for _ in range(24)]
            assert {(a.pipeline_version, a.models[0].name) for a in answers} == {(number, model)}
        logged: Any = pipeline.logs(limit=1000, arrow=True, dataset=["*"])
    # The rows say which process served them: both did.
    served_by: collections.Counter[str] = collections.Counter(
        logged.column("metadata.engine").to_pylist()
    )
    assert set(served_by) == {"engine-1", "engine-1.w1"}, served_by
    assert sum(served_by.values()) == 3 * 24
    # The engine's /metrics counts the requests of every process, not only process 0's.
    text = urllib.request.urlopen(f"http://{two.metrics_address('engine-1')}/metrics").read()
    ok = [
        s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
        if s.name == "hotswap_engine_requests_total" and s.labels["code"] == "OK"
    ]
    assert sum(ok) == 3 * 24, ok


def test_a_worker_that_dies_stops_the_engine(two: LocalStack) -> None:
    [worker] = _workers(two)
    engine = two.processes["engine-1"]
    worker.send_signal(signal.SIGKILL)
    assert engine.wait(30) != 0
    assert "worker process engine-1.w1 exited" in two.log_tail("engine-1", 60)


def test_workers_do_not_outlive_process_0(two: LocalStack) -> None:
    [worker] = _workers(two)
    two.processes["engine-1"].send_signal(signal.SIGKILL)
    # An orphan would keep serving the port with versions nobody coordinates.
    worker.wait(30)  # raises psutil.TimeoutExpired if it lives on
    assert not worker.is_running()


def test_every_process_checks_tokens(tmp_path: Path, assets: Path) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(
        json.dumps(
            {
                "users": [{"name": "alice", "token": TOKEN, "workspaces": ["*"]}],
                "engines": [{"name": "fleet", "token": ENGINE, "names": ["engine-*"]}],
            }
        )
    )
    engine_token = tmp_path / "engine.token"
    engine_token.write_text(ENGINE)
    with LocalStack(
        tmp_path / "stack",
        control_args=("--tokens-file", str(tokens)),
        engine_args=("--control-token-file", str(engine_token), "--processes", "2"),
        security=Security(token=TOKEN),
    ) as stack:
        client = hotswap.Client(stack.control_address, token=TOKEN)
        client.set_current_workspace(client.get_workspace("ws", create_if_not_exist=True))
        model = client.upload_model("rf", assets / "models" / "rf_model.onnx")
        pipeline = client.build_pipeline("p").add_model_step(model).deploy()
        address = stack.engine_addresses[0]
        refused: collections.Counter[grpc.StatusCode] = collections.Counter()
        for _ in range(24):
            with pytest.raises(grpc.RpcError) as excinfo:
                _fresh_call(address)
            refused[excinfo.value.code()] += 1
        assert refused == {grpc.StatusCode.UNAUTHENTICATED: 24}
        answers = [_fresh_call(address, TOKEN) for _ in range(24)]
        assert {a.pipeline_version for a in answers} == {1}
        deadline = time.monotonic() + 10
        while True:  # both processes logged alice's requests (the log is flushed in batches)
            logged: Any = pipeline.logs(limit=100, arrow=True, dataset=["*"])
            engines = set(logged.column("metadata.engine").to_pylist())
            if engines == {"engine-1", "engine-1.w1"} or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert engines == {"engine-1", "engine-1.w1"}
        client.close()
