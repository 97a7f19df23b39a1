"""The swap timeline: ok, aborted (a stalled engine) and rollback swaps, and the stage of each
engine while a swap is in progress."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest

import hotswap
from hotswap.clients import cli
from hotswap.clients._stack import LocalStack
from tests.observability.conftest import MODELS, poll, setup_pipeline


def test_timeline_of_ok_aborted_and_rollback(
    tmp_path: Path, assets: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    two = hotswap.DeploymentConfigBuilder().replica_count(2).build()
    with (
        LocalStack(tmp_path / "s", engines=2, control_args=("--prepare-timeout", "2")) as stack,
        hotswap.Client(stack.control_address) as wl,
    ):
        pipeline, models = setup_pipeline(wl, assets)
        pipeline.deploy(deployment_config=two)
        pipeline.replace_with_model_step(0, models["gbr"])

        stack.kill("engine-2", signal.SIGSTOP)
        failure: list[BaseException] = []

        def deploy() -> None:
            try:
                pipeline.deploy()
            except hotswap.HotswapError as exc:
                failure.append(exc)

        deployer = threading.Thread(target=deploy)
        try:
            deployer.start()
            # While engine-2 is stalled, the status shows the swap and each engine's stage.
            status = poll(
                lambda: (
                    (s := pipeline.status()).get("swap_in_progress", {}).get("engines", {})
                    == {"engine-1": "prepared", "engine-2": "preparing"}
                    and s
                )
            )
            assert status["swap_in_progress"]["target_version"] == 2
            deployer.join(timeout=30)
        finally:
            stack.kill("engine-2", signal.SIGCONT)
        assert len(failure) == 1 and "engine-2" in str(failure[0])
        assert "swap_in_progress" not in pipeline.status()

        pipeline.deploy(version=1)  # a rollback to the rf version
        swaps = pipeline.swaps()
        workspace = wl.get_current_workspace().name()
        argv = ["swaps", "housing", "--address", stack.control_address, "--workspace", workspace]
        assert cli.main(argv) == 0

    # deploy v1 on one engine; the same version on two (a redeploy); v2 aborted; back to v1.
    assert [s["kind"] for s in swaps] == ["redeploy", "deploy", "redeploy", "deploy"]
    rollback, aborted, second, first = swaps
    assert first["outcome"] == "ok" and (first["from_version"], first["to_version"]) == (0, 1)
    assert second["outcome"] == "ok" and (second["from_version"], second["to_version"]) == (1, 1)
    assert len(second["engines"]) == 2
    assert rollback["outcome"] == "ok" and rollback["to_version"] == 1
    assert all(e["reused"] for e in rollback["engines"])  # still loaded: nothing was built

    assert aborted["outcome"] == "aborted"
    assert "engine-2 did not prepare within 2s" in aborted["reason"]
    stages = {e["engine"]: e for e in aborted["engines"]}
    assert stages["engine-2"]["stage"] == "failed"
    assert "did not prepare" in stages["engine-2"]["error"]
    assert stages["engine-1"]["stage"] == "cancelled"  # prepared, then aborted
    assert stages["engine-1"]["load_ms"] > 0 and stages["engine-1"]["prepare_ms"] > 0
    assert 2000 <= aborted["duration_ms"] < 10_000

    for ok in (first, second):
        assert {e["stage"] for e in ok["engines"]} == {"committed"}
        for e in ok["engines"]:
            assert e["prepare_ms"] > 0 and e["commit_ms"] > 0 and e["switch_us"] > 0
        assert ok["prepare_ms"] > 0 and ok["commit_ms"] > 0
        assert ok["requested_by"].startswith("unauthenticated ipv4:127.0.0.1:")
        assert len(ok["request_id"]) == 32

    out = capsys.readouterr().out
    assert "aborted" in out and "redeploy" in out and MODELS["rf"] not in out


def test_requested_by_and_undeploy(tmp_path: Path, assets: Path) -> None:
    from hotswap.v1 import control_pb2

    with (
        LocalStack(tmp_path / "s", engines=1) as stack,
        hotswap.Client(stack.control_address) as wl,
    ):
        pipeline, _ = setup_pipeline(wl, assets)
        ws = wl.get_current_workspace().name()
        wl._channels.control.deploy(
            control_pb2.DeployRequest(
                workspace=ws, pipeline="housing", version=1, requested_by="ci/job-7"
            )
        )
        pipeline.undeploy()
        swaps = pipeline.swaps()
    assert [(s["kind"], s["outcome"]) for s in swaps] == [
        ("undeploy", "ok"),
        ("redeploy", "ok"),
        ("deploy", "ok"),
    ]
    # The client's note is kept beside who the control plane knows the caller to be.
    assert swaps[1]["requested_by"].startswith("unauthenticated ipv4:127.0.0.1:")
    assert swaps[1]["requested_by"].endswith(" (ci/job-7)")
    assert swaps[0]["to_version"] == 0 and swaps[0]["from_version"] == 1
