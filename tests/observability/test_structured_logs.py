"""Service logs as JSON lines, carrying the request id the SDK sent."""

from __future__ import annotations

import json
from pathlib import Path

import hotswap
from hotswap.clients._stack import LocalStack
from tests.observability.conftest import setup_pipeline


def _json_lines(path: Path) -> list[dict[str, object]]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line parses


def test_json_logs_carry_the_request_id(tmp_path: Path, assets: Path) -> None:
    json_logs = ("--log-format", "json")
    with (
        LocalStack(tmp_path / "s", control_args=json_logs, engine_args=json_logs) as stack,
        hotswap.Client(stack.control_address) as wl,
    ):
        pipeline, models = setup_pipeline(wl, assets)
        pipeline.replace_with_model_step(0, models["gbr"]).deploy()
        result = pipeline.last_deploy()
        assert result is not None and len(result.request_id) == 32
        request_id = result.request_id
    logs = tmp_path / "s" / "logs"
    control = _json_lines(logs / "control.log")
    engine = _json_lines(logs / "engine-1.log")
    for line in control + engine:
        assert {"time", "level", "logger", "message", "service"} <= set(line)
    deploy_lines = [line for line in control if line.get("request_id") == request_id]
    assert any("deploy" in str(line["message"]) for line in deploy_lines)
    prepared = [line for line in engine if line.get("request_id") == request_id]
    assert any(str(line["message"]).startswith("prepared") for line in prepared)
    assert all(
        str(line["pipeline"]).endswith("/housing") for line in prepared if "pipeline" in line
    )
    # Model bytes never reach the logs.
    blob = (assets / "models" / "gbr_model.onnx").read_bytes()[:64]
    text = (logs / "engine-1.log").read_bytes() + (logs / "control.log").read_bytes()
    assert blob not in text


def test_text_logs_by_default(tmp_path: Path, assets: Path) -> None:
    with (
        LocalStack(tmp_path / "s") as stack,
        hotswap.Client(stack.control_address) as wl,
    ):
        setup_pipeline(wl, assets)
        request_id = wl.get_pipeline("housing").swaps()[0]["request_id"]
    text = (tmp_path / "s" / "logs" / "control.log").read_text()
    assert f"[request_id={request_id}]" in text
    assert not text.lstrip().startswith("{")
