"""examples/housing/make_models.py: the project's own synthetic demo models and inputs."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from itertools import combinations
from pathlib import Path
from types import ModuleType

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "housing" / "make_models.py"
SEED = 42
# name -> (file, input name); every output is ('variable', tensor(float), [None, 1]).
MODELS = {
    "rf": ("rf_model.onnx", "float_input"),
    "gbr": ("gbr_model.onnx", "float_input"),
    "xgb": ("xgb_model.onnx", "input"),
}
DATA_FILES = ("houses-2.df.json", "houses-1k.arrow")
ALL_FILES = (*(file for file, _ in MODELS.values()), *DATA_FILES, "manifest.json")

F32 = npt.NDArray[np.float32]

# Slow (each trains the three demo models): `make test-slow`, which CI runs too.
pytestmark = pytest.mark.slow


def _need_training_deps() -> None:
    for module in ("sklearn", "skl2onnx", "onnxmltools", "xgboost", "onnx"):
        pytest.importorskip(module, reason="needs the [train] extra")


def run_script(out: Path, seed: int = SEED) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--seed", str(seed)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def digests(directory: Path) -> dict[str, str]:
    return {f: hashlib.sha256((directory / f).read_bytes()).hexdigest() for f in ALL_FILES}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _need_training_deps()
    out = tmp_path_factory.mktemp("housing") / "models"
    result = run_script(out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def houses_1k(models_dir: Path) -> F32:
    with ipc.open_file(models_dir / "houses-1k.arrow") as reader:
        table = reader.read_all()
    flat = table.column("tensor").combine_chunks().flatten().to_numpy()
    return np.asarray(flat, np.float32).reshape(-1, 18)


def session(models_dir: Path, name: str) -> ort.InferenceSession:
    file, _ = MODELS[name]
    return ort.InferenceSession(str(models_dir / file), providers=["CPUExecutionProvider"])


def predict(models_dir: Path, name: str, x: F32) -> F32:
    sess = session(models_dir, name)
    (out,) = sess.run(["variable"], {MODELS[name][1]: x})
    pred = np.asarray(out, np.float32)
    assert pred.shape == (len(x), 1)
    return pred.reshape(-1)


def test_writes_every_file_and_no_temp_files(models_dir: Path) -> None:
    assert sorted(p.name for p in models_dir.iterdir()) == sorted(ALL_FILES)
    for file, _ in MODELS.values():
        size = (models_dir / file).stat().st_size
        assert 10_000 < size < 5_000_000, (file, size)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_signature_matches_the_tutorial_models(models_dir: Path, name: str) -> None:
    sess = session(models_dir, name)
    inputs = [(i.name, i.type, i.shape) for i in sess.get_inputs()]
    outputs = [(o.name, o.type, o.shape) for o in sess.get_outputs()]
    assert inputs == [(MODELS[name][1], "tensor(float)", [None, 18])]
    assert outputs == [("variable", "tensor(float)", [None, 1])]


def test_held_out_houses_are_an_arrow_file_of_float32_tensors(houses_1k: F32) -> None:
    assert houses_1k.shape == (1000, 18)
    assert np.isfinite(houses_1k).all()
    lat, long = houses_1k[:, 11], houses_1k[:, 12]
    assert (lat > 47.1).all() and (lat < 47.8).all()
    assert (long > -122.6).all() and (long < -121.3).all()
    assert np.array_equal(houses_1k[:, 2], houses_1k[:, 9] + houses_1k[:, 10])  # living = sum


def test_arrow_schema(models_dir: Path) -> None:
    with ipc.open_file(models_dir / "houses-1k.arrow") as reader:
        schema = reader.schema
    assert schema.names == ["tensor"]
    assert schema.field("tensor").type == pa.list_(pa.float32(), 18)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_predictions_are_plausible_prices(models_dir: Path, houses_1k: F32, name: str) -> None:
    pred = predict(models_dir, name, houses_1k)
    assert np.isfinite(pred).all()
    assert pred.min() > 50_000 and pred.max() < 8_000_000
    assert 200_000 < float(np.median(pred)) < 1_500_000


def test_models_disagree_enough_to_show_a_swap(models_dir: Path, houses_1k: F32) -> None:
    preds = {name: predict(models_dir, name, houses_1k) for name in MODELS}
    for a, b in combinations(MODELS, 2):
        mean_rel = float(np.mean(np.abs(preds[a] - preds[b]) / preds[a]))
        assert mean_rel > 0.01, (a, b, mean_rel)


def test_demo_houses_json_and_their_predictions(models_dir: Path) -> None:
    records = json.loads((models_dir / "houses-2.df.json").read_text())
    assert len(records) == 2
    assert all(list(r) == ["tensor"] and len(r["tensor"]) == 18 for r in records)
    x = np.asarray([r["tensor"] for r in records], np.float32)
    manifest = json.loads((models_dir / "manifest.json").read_text())
    preds = np.stack([predict(models_dir, name, x) for name in MODELS])
    for name, row in zip(MODELS, preds, strict=True):
        recorded = manifest["models"][name]["demo_predictions"]
        np.testing.assert_allclose(row, recorded, rtol=1e-6)
    spread = preds.max(axis=0) / preds.min(axis=0) - 1  # per house, across the three models
    assert (spread > 0.02).all(), spread


def test_manifest_describes_the_files(models_dir: Path) -> None:
    manifest = json.loads((models_dir / "manifest.json").read_text())
    assert manifest["seed"] == SEED
    assert manifest["synthetic"] is True
    assert len(manifest["features"]) == 18
    found = digests(models_dir)
    for name, (file, input_name) in MODELS.items():
        entry = manifest["models"][name]
        assert entry["file"] == file
        assert entry["sha256"] == found[file]
        assert entry["size_bytes"] == (models_dir / file).stat().st_size
        assert entry["input"] == {"name": input_name, "type": "tensor(float)", "shape": [None, 18]}
        assert entry["output"] == {"name": "variable", "type": "tensor(float)", "shape": [None, 1]}
        assert 0.6 < entry["test_r2"] < 1.0
    for file in DATA_FILES:
        assert manifest["data"][file]["sha256"] == found[file]


def test_same_seed_gives_identical_bytes(models_dir: Path, tmp_path: Path) -> None:
    result = run_script(tmp_path / "again")
    assert result.returncode == 0, result.stderr
    assert digests(tmp_path / "again") == digests(models_dir)


def test_another_seed_gives_other_models(models_dir: Path, tmp_path: Path) -> None:
    result = run_script(tmp_path / "other", seed=SEED + 1)
    assert result.returncode == 0, result.stderr
    first, other = digests(models_dir), digests(tmp_path / "other")
    assert all(first[file] != other[file] for file, _ in MODELS.values())


def _load_script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_models", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_onnx_mismatch_exits_non_zero_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _need_training_deps()
    script = _load_script(monkeypatch)
    monkeypatch.setattr(script, "MAX_REL_DIFF", 0.0)  # no model can be that exact
    out = tmp_path / "never"
    assert script.main(["--out", str(out)]) == 1
    assert "differs from its source model" in capsys.readouterr().err
    assert not out.exists()
