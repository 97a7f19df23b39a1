"""A newcomer's expected mistakes end in a plain sentence and a non-zero exit, never a
traceback and never a silent surprise: busy ports and data dirs, a stalled control plane,
arguments of the wrong type, options that are not applied, NaN inputs."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import hotswap
from hotswap.clients._stack import LocalStack
from hotswap.v1 import control_pb2 as c
from tests.e2e import _api


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout
    )


def _plain_failure(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LocalStack]:
    with LocalStack(tmp_path / "stack", engines=1) as running:
        yield running


def test_one_control_plane_per_port_and_per_data_dir(stack: LocalStack, tmp_path: Path) -> None:
    address = stack.control_address
    busy = _run("hotswap.control", "--listen", address, "--data-dir", str(tmp_path / "other"))
    _plain_failure(busy, f"cannot listen on {address}", "in use by another process")
    data_dir = stack.data_dir / "control"
    pid = stack.processes["control"].pid
    same_dir = _run("hotswap.control", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir))
    _plain_failure(same_dir, f"data dir {data_dir} is in use", f"pid {pid}")
    # Every call through the port still lands in the one store.
    stub = _api.control(address)
    for i in range(6):
        stub.CreateWorkspace(c.CreateWorkspaceRequest(name=f"w{i}"))
    names = {w.name for w in stub.ListWorkspaces(c.ListWorkspacesRequest()).workspaces}
    assert {f"w{i}" for i in range(6)} <= names


def test_an_engine_or_a_stack_on_a_busy_port_says_so(stack: LocalStack, tmp_path: Path) -> None:
    taken = stack.engine_addresses[0]
    engine = _run(
        "hotswap.engine", "--control", stack.control_address, "--listen", taken,
        "--cache-dir", str(tmp_path / "cache"),
    )  # fmt: skip
    _plain_failure(engine, f"cannot listen on {taken}")
    port = stack.control_address.rsplit(":", 1)[1]
    up = _run(
        "hotswap.clients.cli", "up", "--port", port, "--data-dir", str(tmp_path / "up"),
        timeout=90,
    )  # fmt: skip
    _plain_failure(up, "cannot listen on", port)


def test_metrics_stay_on_loopback_whatever_the_service_listens_on(tmp_path: Path) -> None:
    address_file = tmp_path / "control.address"
    process = subprocess.Popen(
        [
            sys.executable, "-m", "hotswap.control", "--listen", "0.0.0.0:0",
            "--data-dir", str(tmp_path / "data"), "--metrics-port", "0",
            "--address-file", str(address_file),
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _api.until(address_file.is_file, "the control plane to start", timeout=30)
        metrics = Path(f"{address_file}.metrics").read_text()
        assert metrics.startswith("127.0.0.1:"), metrics
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_stalled_control_plane_is_named_with_the_time_waited(stack: LocalStack) -> None:
    client = hotswap.Client(stack.control_address)
    stack.kill("control", signal.SIGSTOP)
    try:
        with pytest.raises(hotswap.HotswapTimeoutError) as excinfo:
            client._channels.control.list_workspaces(c.ListWorkspacesRequest(), timeout=1)
    finally:
        stack.kill("control", signal.SIGCONT)
    message = str(excinfo.value)
    assert f"the control plane at {stack.control_address}" in message
    assert "within 1 s" in message and "stalled" in message


def test_wrong_types_options_and_nan_get_sentences(
    stack: LocalStack, assets: Path, tmp_path: Path
) -> None:
    wl = hotswap.Client(stack.control_address)
    rf = wl.upload_model("rf", assets / "models" / "rf_model.onnx")
    pipeline = wl.build_pipeline("p").add_model_step(rf)
    with pytest.raises(hotswap.InvalidInputError, match=r"takes a Model.*wl\.get_model\('gbr'\)"):
        pipeline.replace_with_model_step(0, "gbr")  # type: ignore[arg-type]
    with pytest.raises(hotswap.InvalidInputError, match="whole number"):
        pipeline.replace_with_model_step("0", rf)  # type: ignore[arg-type]

    # More replicas than engines: deployed on what there is, and said.
    config = hotswap.DeploymentConfigBuilder().replica_count(5).build()
    with pytest.warns(hotswap.HotswapWarning, match="asked for 5 replicas but only 1"):
        pipeline.deploy(deployment_config=config)

    x = np.ones((3, 18), np.float32)
    x[1, 4] = np.nan
    table = pa.table({"tensor": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 18)})
    with pytest.raises(hotswap.InvalidInputError, match=r"'tensor'.*row 1.*allow_nan=True"):
        pipeline.infer(table)
    assert pipeline.infer(table, allow_nan=True).num_rows == 3

    not_onnx = tmp_path / "model.png"
    not_onnx.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 500)
    with pytest.raises(hotswap.InvalidInputError) as excinfo:
        wl.upload_model("png", not_onnx)
    message = str(excinfo.value)
    assert message.startswith(f"{not_onnx}: not a loadable ONNX model")
    assert ".part" not in message and "check-" not in message
