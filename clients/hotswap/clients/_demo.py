"""``hotswap demo``: the model hot-swap tutorial, end to end, against a live stack.

Workspace, pipeline, three uploaded models; deploy the random forest, infer two houses, hot-swap
to gradient boosting, infer, hot-swap to XGBoost, infer; then a comparison table, what each swap
cost and which pipeline version served each answer; then undeploy. Without an address it runs
its own control plane and engine in a temporary folder and stops them afterwards.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from hotswap.clients._client import Client
from hotswap.clients._convert import column_to_python, read_table_file
from hotswap.clients._errors import HotswapError
from hotswap.clients._render import grid_text

WORKSPACE = "hotswap-demo"
PIPELINE = "hotswappipeline"
HOUSES = "houses-2.df.json"
# (model name as in the tutorial, file, what it is)
MODELS = (
    ("housingmodelcontrol", "rf_model.onnx", "random forest"),
    ("gbrhousingchallenger", "gbr_model.onnx", "gradient boosting"),
    ("xgbhousingchallenger", "xgb_model.onnx", "XGBoost"),
)


@dataclass(frozen=True, slots=True)
class _Step:
    model: str
    file: str
    version: int
    previous: int
    wall_ms: float
    prepare_ms: float
    commit_ms: float
    served_by: int
    predictions: list[Any]


def missing_files(models_dir: Path) -> list[str]:
    """The demo's input files absent from ``models_dir``."""
    names = [f for _, f, _ in MODELS] + [HOUSES]
    return [n for n in names if not (models_dir / n).is_file()]


def run_demo(models_dir: Path, address: str | None, out: TextIO) -> tuple[int, dict[str, Any]]:
    """Runs the tutorial; returns the exit code and a summary (what ``--json`` prints)."""
    missing = missing_files(models_dir)
    if missing:
        print(
            f"hotswap demo: {models_dir} lacks {', '.join(missing)}.\n"
            "The demo runs on its own synthetic housing models: in the hotswap checkout, "
            "`make models` writes them to examples/housing/models (then run `hotswap demo` "
            "there), or pass --models DIR with rf/gbr/xgb_model.onnx and houses-2.df.json "
            "of your own.",
            file=sys.stderr,
        )
        return 1, {"error": f"missing {', '.join(missing)}"}
    if address is not None:
        return _run(models_dir, address, out)
    from hotswap.clients._stack import LocalStack, StackError

    with tempfile.TemporaryDirectory(prefix="hotswap-demo-") as tmp:
        print("starting a local control plane and one engine ...", file=out, flush=True)
        stack = LocalStack(Path(tmp))
        try:
            stack.start()
        except StackError as err:
            print(f"hotswap demo: the local stack did not start: {err}", file=sys.stderr)
            return 1, {"error": str(err)}
        try:
            print(f"control plane at {stack.control_address}\n", file=out)
            return _run(models_dir, stack.control_address, out)
        finally:
            stack.stop()


def _run(models_dir: Path, address: str, out: TextIO) -> tuple[int, dict[str, Any]]:
    try:
        with Client(address) as wl:
            steps = _tutorial(wl, models_dir, out)
    except HotswapError as err:
        print(f"hotswap demo: {err}", file=sys.stderr)
        return 1, {"error": str(err)}
    _report(steps, models_dir, out)
    summary = {
        "address": address,
        "workspace": WORKSPACE,
        "pipeline": PIPELINE,
        "steps": [dataclasses.asdict(s) for s in steps],
    }
    return 0, summary


def _tutorial(wl: Client, models_dir: Path, out: TextIO) -> list[_Step]:
    def say(text: str) -> None:
        print(text, file=out, flush=True)

    ws = wl.get_workspace(WORKSPACE, create_if_not_exist=True)
    wl.set_current_workspace(ws)
    say(f"workspace   {ws.name()}")
    models = []
    for name, file, kind in MODELS:
        model = wl.upload_model(name, models_dir / file)
        models.append(model)
        say(f"uploaded    {name:<22} {file:<16} {kind:<18} version {model.version()}")
    pipeline = wl.build_pipeline(PIPELINE).clear()
    say(f"pipeline    {pipeline.name()}\n")
    houses, _ = read_table_file(models_dir / HOUSES)

    steps: list[_Step] = []
    for i, model in enumerate(models):
        if i == 0:
            pipeline.add_model_step(model)
        else:
            pipeline.replace_with_model_step(0, model)
        pipeline.deploy()
        deploy = pipeline.last_deploy()
        assert deploy is not None
        result = pipeline.infer(houses)
        served = pipeline.last_served()
        assert served is not None
        predictions = [row[0] if row else None for row in column_to_python(result["out.variable"])]
        verb = "deployed   " if i == 0 else "hot-swapped"
        say(
            f"{verb} {model.name()} as pipeline version {deploy.version} in "
            f"{deploy.wall_ms:.0f} ms (server: prepare {deploy.prepare_ms:.0f} ms, "
            f"commit {deploy.commit_ms:.1f} ms)"
        )
        say(f"  inferred  {predictions}  (served by pipeline version {served.pipeline_version})")
        steps.append(
            _Step(
                model.name(),
                MODELS[i][1],
                deploy.version,
                deploy.previous,
                deploy.wall_ms,
                deploy.prepare_ms,
                deploy.commit_ms,
                served.pipeline_version,
                predictions,
            )
        )
    pipeline.undeploy()
    say(f"\nundeployed  {pipeline.name()}")
    return steps


def _report(steps: list[_Step], models_dir: Path, out: TextIO) -> None:
    houses = len(steps[0].predictions)
    rows = [[f"house {h + 1}", *(s.predictions[h] for s in steps)] for h in range(houses)]
    print("\npredicted price per house and model\n", file=out)
    print(grid_text(["", *(f"{s.model} ({s.file})" for s in steps)], rows), file=out)
    print("\nthe swaps\n", file=out)
    print(
        grid_text(
            [
                "model",
                "pipeline version",
                "replaced",
                "deploy() ms",
                "prepare ms",
                "commit ms",
                "served by version",
            ],
            [
                [
                    s.model,
                    s.version,
                    s.previous or "",
                    f"{s.wall_ms:.0f}",
                    f"{s.prepare_ms:.0f}",
                    f"{s.commit_ms:.1f}",
                    s.served_by,
                ]
                for s in steps
            ],
        ),
        file=out,
    )
    print(f"\nmodels from {models_dir}", file=out, flush=True)
