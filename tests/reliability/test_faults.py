"""Faults with real processes and real signals: nothing half-done survives, nothing is lost."""

from __future__ import annotations

import signal
import subprocess
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from hotswap.clients._stack import LocalStack
from hotswap.engine.servicers import STREAM_WINDOW
from hotswap.v1 import control_pb2 as c
from hotswap.v1 import engine_pb2 as e
from tests.e2e import _api
from tests.e2e.conftest import seed_models

# Slow (processes killed and restarted): `make test-slow`, which CI runs too.
pytestmark = pytest.mark.slow


def _deployed(stub: Any) -> int:
    pipeline = stub.GetPipeline(c.GetPipelineRequest(workspace=_api.WS, name="housing"))
    return int(pipeline.deployed.number)


def _status(stub: Any) -> Any:
    return stub.GetPipelineStatus(c.GetPipelineStatusRequest(workspace=_api.WS, pipeline="housing"))


def _serving(stack: LocalStack, name: str) -> int:
    x = np.ones((1, 18), np.float32)
    answer = _api.infer(
        _api.engine(stack.address_of(name)), "housing", _api.ipc_stream(_api.tensor_table(x))
    )
    return answer.version


def _in_background(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except grpc.RpcError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_control_plane_killed_during_upload_leaves_nothing(tmp_path: Path, assets: Path) -> None:
    with LocalStack(tmp_path / "s") as stack:
        stub = _api.control(stack.control_address)
        stub.CreateWorkspace(c.CreateWorkspaceRequest(name=_api.WS))
        data = (assets / "models" / "rf_model.onnx").read_bytes()
        halfway = threading.Event()
        release = threading.Event()

        def slow_upload() -> Iterator[c.UploadModelRequest]:
            for i, request in enumerate(_api.upload_requests("rf", data)):
                if i == 2:
                    halfway.set()
                    release.wait(30)  # hold the stream open until the control plane is dead
                yield request

        thread, outcome = _in_background(lambda: stub.UploadModel(slow_upload()))
        assert halfway.wait(20)
        _api.until(lambda: any((stack.data_dir / "control/blobs/tmp").iterdir()), "a temp file")
        stack.kill("control", signal.SIGKILL)
        release.set()
        thread.join(30)
        assert isinstance(outcome[0], grpc.RpcError)

        stack.start_control()
        stub = _api.control(stack.control_address)
        assert stub.ListModels(c.ListModelsRequest(workspace=_api.WS)).models == []
        blobs = stack.data_dir / "control" / "blobs"
        assert [p for p in blobs.rglob("*") if p.is_file()] == []


def test_control_plane_killed_during_deploy_keeps_one_version(tmp_path: Path, assets: Path) -> None:
    with LocalStack(tmp_path / "s", engines=2) as stack:
        stub = _api.control(stack.control_address)
        seed_models(stub, assets)
        v1 = _api.new_version(stub, "housing", "rf").number
        _api.deploy(stub, "housing", v1, replicas=2)
        v2 = _api.new_version(stub, "housing", "gbr").number

        stack.kill("engine-2", signal.SIGSTOP)  # holds the prepare phase open
        thread, outcome = _in_background(lambda: _api.deploy(stub, "housing", v2))
        needle = f"deploy {_api.WS}/housing v{v2} "
        _api.until(lambda: needle in stack.log_tail("control", 50), "the deploy to start")
        stack.kill("control", signal.SIGKILL)
        thread.join(30)
        assert isinstance(outcome[0], grpc.RpcError)
        stack.kill("engine-2", signal.SIGCONT)

        stack.start_control()
        stub = _api.control(stack.control_address)
        stack.wait_engines_connected(stack.engine_names)
        _api.until(lambda: _status(stub).status == "Running", "status Running")
        # Never a mix: the store and every engine agree on the old version.
        assert _deployed(stub) == v1
        assert [en.serving_version for en in _status(stub).engines] == [v1, v1]
        assert {_serving(stack, n) for n in stack.engine_names} == {v1}
        # The swap prepared for the dead control plane was dropped; new deploys work.
        assert _api.deploy(stub, "housing", v2).version.number == v2
        assert {_serving(stack, n) for n in stack.engine_names} == {v2}


# An engine killed around the commit point: both branches, taken on purpose with scripted
# engines, are in tests/security/test_deploy_reports.py.


def test_engine_killed_while_serving_others_keep_serving_and_it_rejoins_from_cache(
    tmp_path: Path, assets: Path
) -> None:
    with LocalStack(tmp_path / "s", engines=2) as stack:
        stub = _api.control(stack.control_address)
        seed_models(stub, assets)
        v1 = _api.new_version(stub, "housing", "gbr").number
        _api.deploy(stub, "housing", v1, replicas=2)
        fetches_before = stack.log_tail("engine-2", 1000).count("fetching blob")
        assert fetches_before == 1

        survivor = _api.engine(stack.address_of("engine-1"))
        body = _api.ipc_stream(_api.tensor_table(np.ones((4, 18), np.float32)))
        stop = threading.Event()
        served: list[int] = []
        errors: list[str] = []

        def load() -> None:
            while not stop.is_set():
                try:
                    served.append(_api.infer(survivor, "housing", body).version)
                except grpc.RpcError as exc:
                    errors.append(str(exc.code()))

        loader = threading.Thread(target=load)
        loader.start()
        try:
            _api.until(lambda: len(served) > 20, "load on engine-1")
            stack.kill("engine-2", signal.SIGKILL)
            count = len(served)
            _api.until(lambda: len(served) > count + 50, "engine-1 to keep serving")
        finally:
            stop.set()
            loader.join(30)
        assert errors == [] and set(served) == {v1}

        stack.start_engine("engine-2")
        # Every engine Running: the pipeline alone reads Running while engine-2 is still Lost.
        _api.until(
            lambda: [en.status for en in _status(stub).engines] == ["Running", "Running"],
            "engine-2 to rejoin",
        )
        assert _serving(stack, "engine-2") == v1
        assert stack.log_tail("engine-2", 1000).count("fetching blob") == fetches_before


def test_corrupt_blob_on_the_control_plane_is_reported_never_served(
    tmp_path: Path, assets: Path
) -> None:
    with LocalStack(tmp_path / "s") as stack:
        stub = _api.control(stack.control_address)
        uploaded = seed_models(stub, assets)
        v1 = _api.new_version(stub, "housing", "rf").number
        _api.deploy(stub, "housing", v1)
        sha = uploaded["gbr"].sha256
        blob = stack.data_dir / "control" / "blobs" / sha[:2] / sha
        corrupted = bytearray(blob.read_bytes())
        corrupted[len(corrupted) // 2] ^= 0xFF
        blob.write_bytes(bytes(corrupted))

        v2 = _api.new_version(stub, "housing", "gbr").number
        with pytest.raises(grpc.RpcError) as failed:
            _api.deploy(stub, "housing", v2)
        error: Any = failed.value
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "corrupt on the control plane" in error.details()
        assert "upload the model again" in error.details()
        assert _deployed(stub) == v1 and _serving(stack, "engine-1") == v1


def test_abandoned_streams_and_cancelled_calls_do_not_block_others(
    tmp_path: Path, assets: Path
) -> None:
    with LocalStack(tmp_path / "s") as stack:
        stub = _api.control(stack.control_address)
        seed_models(stub, assets)
        _api.deploy(stub, "housing", _api.new_version(stub, "housing", "rf").number)
        engine = _api.engine(stack.engine_addresses[0])
        body = _api.ipc_stream(_api.tensor_table(np.ones((100, 18), np.float32)))

        # A streaming client that sends 2,000 requests and never reads an answer.
        requests = (
            e.InferRequest(workspace=_api.WS, pipeline="housing", arrow=body, request_id=i)
            for i in range(2000)
        )
        abandoned = engine.InferStream(requests)
        # The engine works on at most a window of them at once, however many are sent.
        metrics = f"http://{stack.metrics_address('engine-1')}/metrics"
        in_flight = [_gauge(metrics, "hotswap_engine_requests_in_flight") for _ in range(20)]
        assert max(in_flight) <= STREAM_WINDOW + 1
        # Clients that give up mid-request (a 5,000-row request takes milliseconds).
        big = _api.ipc_stream(_api.tensor_table(np.ones((5000, 18), np.float32)))
        for _ in range(50):
            with pytest.raises(grpc.RpcError) as gave_up:
                _api.infer(engine, "housing", big, timeout=0.0005)
            assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Everyone else is served promptly.
        for _ in range(20):
            assert _api.infer(engine, "housing", body, timeout=5).version == 1
        abandoned.cancel()
        assert _api.infer(engine, "housing", body, timeout=5).version == 1
        assert stack.processes["engine-1"].poll() is None


def _gauge(url: str, name: str) -> float:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_upload_is_resource_exhausted_and_consistent(
    small_disk: Path, tmp_path: Path, assets: Path
) -> None:
    # The whole stack's data dir (database, blobs, caches) lives on the 2 MiB tmpfs.
    with LocalStack(small_disk / "stack") as stack:
        stub = _api.control(stack.control_address)
        stub.CreateWorkspace(c.CreateWorkspaceRequest(name=_api.WS))
        rf = (assets / "models" / "rf_model.onnx").read_bytes()
        _api.upload(stub, "rf", rf)
        big = rf * 12  # ~2.6 MB: cannot fit
        with pytest.raises(grpc.RpcError) as full:
            _api.upload(stub, "big", big)
        error: Any = full.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "disk is full" in error.details()
        models = stub.ListModels(c.ListModelsRequest(workspace=_api.WS)).models
        assert [m.name for m in models] == ["rf"]
        assert list((stack.data_dir / "control" / "blobs" / "tmp").iterdir()) == []
        # Still works once the failed upload's space is back.
        _api.upload(stub, "rf-again", rf)
