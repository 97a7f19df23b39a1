"""``hotswap demo``: the tutorial end to end, on its own stack or on a running one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hotswap.clients._stack import LocalStack

MODEL_NAMES = ("housingmodelcontrol", "gbrhousingchallenger", "xgbhousingchallenger")


@pytest.fixture
def models_dir(tmp_path: Path, assets: Path) -> Path:
    """What `make models` makes, from the shared tutorial assets: three models, two houses."""
    out = tmp_path / "models"
    out.mkdir()
    for name in ("rf_model.onnx", "gbr_model.onnx", "xgb_model.onnx"):
        shutil.copy(assets / "models" / name, out / name)
    house = json.loads((assets / "data" / "xtest-1.df.json").read_text())[0]
    (out / "houses-2.df.json").write_text(json.dumps([house, house]))
    return out


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hotswap.clients.cli", "demo", *args],
        capture_output=True,
        text=True,
        timeout=55,
    )


def test_demo_on_its_own_stack(models_dir: Path) -> None:
    proc = _demo("--models", str(models_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in (*MODEL_NAMES, "rf_model.onnx", "gbr_model.onnx", "xgb_model.onnx"):
        assert name in proc.stdout, name
    assert "718013.7" in proc.stdout
    assert "undeployed" in proc.stdout
    assert "served by" in proc.stdout


def test_demo_against_a_running_stack_twice_with_json(models_dir: Path, tmp_path: Path) -> None:
    with LocalStack(tmp_path / "stack") as stack:
        for run in range(2):  # a second run reuses the workspace and pipeline
            proc = _demo("--address", stack.control_address, "--models", str(models_dir), "--json")
            assert proc.returncode == 0, proc.stderr
            summary = json.loads(proc.stdout)
            steps = summary["steps"]
            assert [s["model"] for s in steps] == list(MODEL_NAMES)
            assert [s["served_by"] for s in steps] == [s["version"] for s in steps]
            assert steps[0]["predictions"] == [718013.7, 718013.7]
            assert steps[-1]["version"] == 3 * (run + 1)
            assert "hot-swapped" in proc.stderr


def test_missing_models_say_how_to_make_them(tmp_path: Path) -> None:
    proc = _demo("--models", str(tmp_path))
    assert proc.returncode == 1
    assert "make models" in proc.stderr
    assert "rf_model.onnx" in proc.stderr


def test_the_tutorial_notebook_runs(models_dir: Path, tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[2] / "examples" / "hot_swap_tutorial.py"
    with LocalStack(tmp_path / "stack") as stack:
        env = {
            **os.environ,
            "HOTSWAP_ADDRESS": stack.control_address,
            "HOTSWAP_MODELS": str(models_dir),
        }
        proc = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=55
        )
    assert proc.returncode == 0, proc.stderr
    assert "out.variable: [718013.7]" in proc.stdout
    assert proc.stdout.rstrip().endswith("Undeployed")
