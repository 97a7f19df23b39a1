"""Train hotswap's own demo models on a SYNTHETIC King County-like housing dataset.

Nothing here comes from a real data set: every house is drawn from a numpy RNG seeded with
``--seed``, with features in the same 18-column layout the Wallaroo hot-swap tutorial uses,
so the demo can swap between three regressors with identical ONNX signatures.

    python examples/housing/make_models.py --out examples/housing/models [--seed 42]

Writes (each atomically: temp file + rename) ``rf_model.onnx``, ``gbr_model.onnx``,
``xgb_model.onnx``, ``houses-2.df.json``, ``houses-1k.arrow`` and ``manifest.json``.
Exits non-zero, writing nothing, when an ONNX model disagrees with the model it came from.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxmltools
import onnxruntime as ort
import pyarrow as pa
import pyarrow.ipc as ipc
import skl2onnx
import sklearn
import xgboost
from onnxmltools import convert_xgboost
from onnxmltools.convert.common.data_types import FloatTensorType as MLFloatTensorType
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
from sklearn.metrics import r2_score
from xgboost import XGBRegressor

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

FEATURES = (
    "bedrooms",
    "bathrooms",
    "sqft_living",
    "sqft_lot",
    "floors",
    "waterfront",
    "view",
    "condition",
    "grade",
    "sqft_above",
    "sqft_basement",
    "lat",
    "long",
    "sqft_living15",
    "sqft_lot15",
    "house_age",
    "renovated",
    "yrs_since_renovation",
)
N_FEATURES = len(FEATURES)
N_ROWS = 5000
N_TEST = 1000
OUTPUT_NAME = "variable"
# The tutorial models' opsets (ai.onnx 15, ai.onnx.ml 1): any onnxruntime >= 1.11 loads them.
TARGET_OPSET = 15
MAX_REL_DIFF = 1e-4
MIN_MODEL_SPREAD = 0.01  # mean pairwise relative difference between models on held-out rows
# Two hand-written demo houses (FEATURES order) on which the three models disagree visibly.
DEMO_HOUSES: tuple[tuple[float, ...], ...] = (
    # A 3-bed, 1,710 sqft single-storey house in south King County, built 25 years ago.
    (3, 1.75, 1710, 7200, 1, 0, 0, 3, 7, 1710, 0, 47.3100, -122.3000, 1650, 7500, 25, 0, 0),
    # A 5-bed, 4,200 sqft new-build with some view, on the Eastside near Bellevue.
    (5, 3.5, 4200, 12_000, 2, 0, 2, 3, 11, 4200, 0, 47.6300, -122.1800, 3800, 11_000, 8, 0, 0),
)


@dataclass(frozen=True)
class Dataset:
    x_train: F32
    y_train: F64
    x_test: F32
    y_test: F64


@dataclass(frozen=True)
class ModelSpec:
    name: str
    file: str
    input_name: str
    train: Callable[[F32, F64, int], Any]
    convert: Callable[[Any, str], onnx.ModelProto]


# ---------------------------------------------------------------- synthetic data


def _features(rng: np.random.Generator, n: int) -> F64:
    """Draw `n` plausible houses as an (n, 18) float64 matrix in FEATURES order."""
    grade = np.clip(np.rint(rng.normal(7.7, 1.15, n)), 4, 13)
    living = np.clip(np.exp(rng.normal(np.log(1950) + 0.22 * (grade - 7.7), 0.28, n)), 400, 9000)
    living = np.rint(living / 10) * 10
    bedrooms = np.clip(np.rint(0.9 + living / 750 + rng.normal(0, 0.7, n)), 1, 9)
    bathrooms = np.clip(np.rint(4 * (0.6 + living / 1400 + rng.normal(0, 0.35, n))) / 4, 0.75, 6)
    floors = rng.choice([1.0, 1.5, 2.0, 2.5, 3.0], n, p=[0.49, 0.09, 0.38, 0.01, 0.03])
    has_basement = rng.random(n) < 0.4
    basement = np.where(has_basement, np.rint(living * rng.uniform(0.15, 0.45, n) / 10) * 10, 0)
    above = living - basement
    lot = np.rint(np.clip(np.exp(rng.normal(np.log(7600), 0.75, n)), 600, 1_000_000))
    waterfront = (rng.random(n) < 0.01).astype(np.float64)
    view = rng.choice([0.0, 1.0, 2.0, 3.0, 4.0], n, p=[0.9, 0.015, 0.045, 0.025, 0.015])
    view = np.where(waterfront == 1, np.maximum(view, 3), view)
    condition = rng.choice([1.0, 2.0, 3.0, 4.0, 5.0], n, p=[0.002, 0.008, 0.65, 0.26, 0.08])
    lat = np.round(np.clip(rng.normal(47.56, 0.14, n), 47.16, 47.78), 4)
    long = np.round(np.clip(rng.normal(-122.21, 0.14, n), -122.52, -121.32), 3)
    living15 = np.rint(np.clip(0.6 * living + 800 * rng.lognormal(0, 0.2, n), 450, 6300) / 10) * 10
    lot15 = np.rint(np.clip(lot * rng.lognormal(0, 0.3, n), 650, 900_000))
    age = rng.integers(0, 116, n).astype(np.float64)
    renovated = ((age > 20) & (rng.random(n) < 0.06)).astype(np.float64)
    since = np.where(renovated == 1, np.floor(age * rng.random(n)), 0)
    columns = [bedrooms, bathrooms, living, lot, floors, waterfront, view, condition, grade]
    columns += [above, basement, lat, long, living15, lot15, age, renovated, since]
    return np.column_stack(columns).astype(np.float64)


def _prices(rng: np.random.Generator, x: F64) -> F64:
    """Price in dollars: driven by size, grade, water, view, location, age, plus noise."""
    col = {name: x[:, i] for i, name in enumerate(FEATURES)}
    log_price = (
        np.log(520_000)
        + 0.75 * np.log(col["sqft_living"] / 2000)
        + 0.17 * (col["grade"] - 7.7)
        + 0.65 * col["waterfront"]
        + 0.07 * col["view"]
        + 0.04 * (col["condition"] - 3)
        + 1.3 * (col["lat"] - 47.55)
        - 0.5 * np.abs(col["long"] + 122.2)
        + 0.0001 * (col["house_age"] - 55) ** 2
        - 0.2
        + 0.08 * col["renovated"]
        + 0.05 * np.log(col["sqft_lot"] / 7600)
    )
    noise = rng.normal(0, 0.16, len(x))
    return np.asarray(np.clip(np.rint(np.exp(log_price + noise)), 75_000, 7_500_000), np.float64)


def make_dataset(seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    x = _features(rng, N_ROWS)
    y = _prices(rng, x)
    x32 = x.astype(np.float32)
    split = N_ROWS - N_TEST
    return Dataset(x32[:split], y[:split], x32[split:], y[split:])


# ---------------------------------------------------------------- models


def train_rf(x: F32, y: F64, seed: int) -> Any:
    model = RandomForestRegressor(
        n_estimators=30, max_depth=10, min_samples_leaf=3, random_state=seed, n_jobs=1
    )
    return model.fit(x, y)


def train_gbr(x: F32, y: F64, seed: int) -> Any:
    model = GradientBoostingRegressor(
        n_estimators=100, max_depth=4, learning_rate=0.1, subsample=0.9, random_state=seed
    )
    return model.fit(x, y)


def train_xgb(x: F32, y: F64, seed: int) -> Any:
    model = XGBRegressor(
        n_estimators=100,
        max_depth=5,
        learning_rate=0.1,
        subsample=0.9,
        colsample_bytree=0.9,
        tree_method="hist",
        random_state=seed,
        n_jobs=1,
    )
    return model.fit(x, y)


def convert_skl(model: Any, input_name: str) -> onnx.ModelProto:
    inputs = [(input_name, FloatTensorType([None, N_FEATURES]))]
    proto: onnx.ModelProto = convert_sklearn(model, initial_types=inputs, target_opset=TARGET_OPSET)
    return proto


def convert_xgb(model: Any, input_name: str) -> onnx.ModelProto:
    inputs = [(input_name, MLFloatTensorType([None, N_FEATURES]))]
    proto: onnx.ModelProto = convert_xgboost(model, initial_types=inputs, target_opset=TARGET_OPSET)
    return proto


def finalise(proto: onnx.ModelProto, name: str) -> bytes:
    """Check the signature, name the output `variable` and make the bytes reproducible."""
    graph = proto.graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise ValueError(f"{name}: expected one input and one output")
    out = graph.output[0]
    if out.name != OUTPUT_NAME:
        for node in graph.node:
            node.output[:] = [OUTPUT_NAME if o == out.name else o for o in node.output]
        out.name = OUTPUT_NAME
    for value, width in ((graph.input[0], N_FEATURES), (out, 1)):
        if _signature(value)[1:] != (onnx.TensorProto.FLOAT, [None, width]):
            raise ValueError(f"{name}: unexpected signature {_signature(value)}")
    graph.name = f"hotswap_housing_{name}"  # converters default to a random uuid
    proto.doc_string = f"hotswap demo model '{name}' trained on synthetic housing data"
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _signature(value: onnx.ValueInfoProto) -> tuple[str, int, list[int | None]]:
    tensor = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    return value.name, tensor.elem_type, dims


MODELS = (
    ModelSpec("rf", "rf_model.onnx", "float_input", train_rf, convert_skl),
    ModelSpec("gbr", "gbr_model.onnx", "float_input", train_gbr, convert_skl),
    ModelSpec("xgb", "xgb_model.onnx", "input", train_xgb, convert_xgb),
)


@dataclass(frozen=True)
class Built:
    spec: ModelSpec
    onnx_bytes: bytes
    r2: float
    max_rel_diff: float
    test_pred: F32
    demo_pred: F32


def onnx_predict(onnx_bytes: bytes, x: F32) -> F32:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    (out,) = session.run([OUTPUT_NAME], {session.get_inputs()[0].name: x})
    pred = np.asarray(out, np.float32)
    if pred.shape != (len(x), 1):
        raise ValueError(f"ONNX output has shape {pred.shape}, expected ({len(x)}, 1)")
    return pred.reshape(-1)


def build(spec: ModelSpec, data: Dataset, seed: int, demo: F32) -> Built:
    model = spec.train(data.x_train, data.y_train, seed)
    onnx_bytes = finalise(spec.convert(model, spec.input_name), spec.name)
    native = np.asarray(model.predict(data.x_test), np.float64)
    pred = onnx_predict(onnx_bytes, data.x_test)
    rel = np.abs(pred.astype(np.float64) - native) / np.maximum(np.abs(native), 1.0)
    return Built(
        spec=spec,
        onnx_bytes=onnx_bytes,
        r2=float(r2_score(data.y_test, native)),
        max_rel_diff=float(rel.max()),
        test_pred=pred,
        demo_pred=onnx_predict(onnx_bytes, demo),
    )


def mean_spread(built: list[Built]) -> float:
    """Smallest mean relative difference between any two models' held-out predictions."""
    spreads = []
    for i, a in enumerate(built):
        for b in built[i + 1 :]:
            diff = np.abs(a.test_pred - b.test_pred) / np.maximum(np.abs(a.test_pred), 1.0)
            spreads.append(float(diff.mean()))
    return min(spreads)


# ---------------------------------------------------------------- outputs


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same directory and a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # mode honours umask
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def records_json(x: F32) -> bytes:
    """pandas `to_json(orient="records")` layout: [{"tensor": [18 floats]}, ...].

    Values are the shortest decimals that read back as the same float32 (47.31, not
    47.310001373291016), so a client sends exactly the rows the models were checked on.
    """
    rows = [{"tensor": [float(str(v)) for v in row]} for row in x]
    back = np.asarray([r["tensor"] for r in rows], np.float32)
    if not np.array_equal(back, x):
        raise ValueError("demo houses do not round-trip through JSON as float32")
    return json.dumps(rows, separators=(",", ":")).encode()


def arrow_file(x: F32) -> bytes:
    """Arrow IPC file with one `tensor` column of fixed_size_list<float32>[18]."""
    values = pa.array(x.reshape(-1), pa.float32())
    column = pa.FixedSizeListArray.from_arrays(values, N_FEATURES)
    field = pa.field("tensor", column.type, metadata={"tensor_type": '{"shape": [18]}'})
    table = pa.Table.from_arrays([column], schema=pa.schema([field]))
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def library_versions() -> dict[str, str]:
    """The libraries whose versions decide the models' bytes."""
    libraries = (np, sklearn, xgboost, skl2onnx, onnxmltools, onnx)
    return {lib.__name__: str(lib.__version__) for lib in libraries}


def manifest(seed: int, built: list[Built], data_files: dict[str, bytes]) -> bytes:
    models: dict[str, Any] = {}
    for b in built:
        models[b.spec.name] = {
            "file": b.spec.file,
            "sha256": _sha256(b.onnx_bytes),
            "size_bytes": len(b.onnx_bytes),
            "input": {"name": b.spec.input_name, "type": "tensor(float)", "shape": [None, 18]},
            "output": {"name": OUTPUT_NAME, "type": "tensor(float)", "shape": [None, 1]},
            "test_r2": round(b.r2, 6),
            "demo_predictions": [round(float(p), 2) for p in b.demo_pred],
        }
    doc = {
        "synthetic": True,
        "seed": seed,
        "features": list(FEATURES),
        "rows": {"train": N_ROWS - N_TEST, "test": N_TEST},
        "models": models,
        "data": {name: {"sha256": _sha256(raw)} for name, raw in data_files.items()},
        "trained_with": library_versions(),
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


def write_outputs(out: Path, seed: int, data: Dataset, demo: F32, built: list[Built]) -> None:
    """Write every file, the manifest last: a complete manifest means a complete directory."""
    data_files = {
        "houses-2.df.json": records_json(demo),
        "houses-1k.arrow": arrow_file(data.x_test),
    }
    index = manifest(seed, built, data_files)
    out.mkdir(parents=True, exist_ok=True)
    for b in built:
        write_atomic(out / b.spec.file, b.onnx_bytes)
    for name, raw in data_files.items():
        write_atomic(out / name, raw)
    write_atomic(out / "manifest.json", index)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=42, help="RNG seed (default 42)")
    return parser.parse_args(argv)


def report(built: list[Built], seconds: float) -> None:
    print(f"trained 3 models on synthetic housing data in {seconds:.1f}s")
    for b in built:
        demo = " / ".join(f"${p:,.0f}" for p in b.demo_pred)
        size = len(b.onnx_bytes) / 1024
        print(
            f"  {b.spec.file:15} {size:7.0f} KiB  R2={b.r2:.3f}  "
            f"max rel diff={b.max_rel_diff:.1e}  demo houses: {demo}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    data = make_dataset(args.seed)
    demo = np.asarray(DEMO_HOUSES, np.float32)
    built = [build(spec, data, args.seed, demo) for spec in MODELS]
    report(built, time.perf_counter() - start)
    bad = [b.spec.file for b in built if not b.max_rel_diff < MAX_REL_DIFF]
    if bad:
        print(
            f"error: ONNX differs from its source model by > {MAX_REL_DIFF}: {bad}", file=sys.stderr
        )
        return 1
    spread = mean_spread(built)
    if spread < MIN_MODEL_SPREAD:
        print(f"error: models too alike to demo a swap (spread {spread:.2%})", file=sys.stderr)
        return 1
    write_outputs(args.out, args.seed, data, demo, built)
    print(f"wrote {len(MODELS)} models, 2 data files and manifest.json to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
