"""What each ``hotswap`` subcommand does. Every command returns an :class:`Output`: plain data
for ``--json`` and a text rendering for a terminal."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from hotswap.clients._client import Client
from hotswap.clients._convert import (
    check_result_path,
    column_to_python,
    read_table_file,
    table_to_records,
    to_ipc,
    write_result,
)
from hotswap.clients._deploy import DeploymentConfig, DeployResult
from hotswap.clients._errors import EntityNotFoundError, HotswapError, InvalidInputError
from hotswap.clients._pipeline import Pipeline
from hotswap.clients._render import grid_text, kv_text
from hotswap.clients._rollout import Rollout

__all__ = ["HotswapError", "Output", "emit"]

# A terminal gets at most this many result rows; --output or --json get them all.
MAX_TABLE_ROWS = 50


@dataclass(frozen=True, slots=True)
class Output:
    """A command's result: ``data`` for ``--json``, ``text`` for people, or raw bytes."""

    data: Any
    text: str
    binary: bytes | None = None
    exit_code: int = 0


def emit(output: Output, *, as_json: bool) -> None:
    """Writes a command's output to stdout."""
    if output.binary is not None:
        sys.stdout.buffer.write(output.binary)
        sys.stdout.buffer.flush()
    elif as_json:
        print(json.dumps(output.data, indent=2, default=str))
    elif output.text:
        print(output.text)


def _client(args: argparse.Namespace) -> Client:
    wl = Client(args.address)
    if args.workspace:
        try:
            wl.set_current_workspace(args.workspace)
        except EntityNotFoundError:
            wl.close()
            raise EntityNotFoundError(
                f"workspace {args.workspace!r} not found: create it with "
                f"`hotswap workspace create {args.workspace}`"
            ) from None
    return wl


# --- workspaces --------------------------------------------------------------------------------


def workspace_create(args: argparse.Namespace) -> Output:
    with _client(args) as wl:
        ws = wl.create_workspace(args.name)
        return Output(ws.to_dict(), kv_text(list(ws.to_dict().items())))


def workspace_list(args: argparse.Namespace) -> Output:
    with _client(args) as wl:
        spaces = wl.list_workspaces()
        return Output([w.to_dict() for w in spaces], repr(spaces))


# --- models ------------------------------------------------------------------------------------


def _progress(label: str) -> Any:
    """An upload's progress bar on a terminal (tqdm); nothing when stderr is not one."""
    if not sys.stderr.isatty():
        return None
    bar: tqdm[Any] | None = None

    def show(sent: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=f"uploading {label}", unit="B", unit_scale=True)
        bar.update(sent - bar.n)
        if sent >= total:
            bar.close()

    return show


def model_upload(args: argparse.Namespace) -> Output:
    with _client(args) as wl:
        model = wl.upload_model(args.name, args.file, progress=_progress(Path(args.file).name))
        return Output(model.to_dict(), repr(model))


def model_list(args: argparse.Namespace) -> Output:
    with _client(args) as wl:
        models = wl.list_models()
        return Output([m.to_dict() for m in models], repr(models))


def model_show(args: argparse.Namespace) -> Output:
    with _client(args) as wl:
        latest = wl.get_model(args.name)
        versions = latest.versions()
        data = {**latest.to_dict(), "versions": [v.to_dict() for v in versions]}
        rows = [(v.version(), v.sha()[:12], v.size(), v.created()) for v in versions]
        text = kv_text(latest._pairs()) + "\n\nversions (oldest first)\n"
        text += grid_text(("version", "sha", "bytes", "created"), rows)
        return Output(data, text)


# --- pipelines ---------------------------------------------------------------------------------


def _latest(wl: Client, name: str) -> Pipeline:
    """The pipeline with its latest version's steps staged (the CLI keeps no local state)."""
    pipeline = wl.get_pipeline(name)
    versions = pipeline.versions()
    return wl.get_pipeline(name, version=versions[-1].number()) if versions else pipeline


def pipeline_create(args: argparse.Namespace) -> Output:
    with _client(args) as wl:
        pipeline = wl.build_pipeline(args.name)
        return Output(pipeline.to_dict(), repr(pipeline))


def pipeline_list(args: argparse.Namespace) -> Output:
    with _client(args) as wl:
        pipelines = wl.list_pipelines()
        return Output([p.to_dict() for p in pipelines], repr(pipelines))


def _new_version(args: argparse.Namespace, index: int | None) -> Output:
    with _client(args) as wl:
        pipeline = _latest(wl, args.pipeline)
        model = wl.get_model(args.model, args.model_version)
        if index is None:
            pipeline.add_model_step(model)
        else:
            pipeline.replace_with_model_step(index, model)
        version = pipeline.create_version()
        text = repr(version) + f"\n\nnot deployed yet: hotswap pipeline deploy {args.pipeline}"
        return Output(version.to_dict(), text)


def pipeline_add_step(args: argparse.Namespace) -> Output:
    return _new_version(args, None)


def pipeline_replace(args: argparse.Namespace) -> Output:
    return _new_version(args, args.index)


def _deploy_output(pipeline: Pipeline, result: DeployResult) -> Output:
    if result.previous == result.version:
        verb = "redeployed (it was already live; nothing changed)"
    elif result.previous:
        verb = f"hot-swapped from version {result.previous} to"
    else:
        verb = "deployed"
    text = (
        f"{pipeline.name()}: {verb} version {result.version} in {result.wall_ms:.0f} ms "
        f"(server: prepare {result.prepare_ms:.0f} ms, commit {result.commit_ms:.1f} ms)"
    )
    rows = [
        (
            e.engine,
            e.address,
            f"{e.prepare_ms:.0f}",
            f"{e.load_ms:.0f}",
            f"{e.warmup_ms:.0f}",
            f"{e.commit_ms:.1f}",
            f"{e.switch_us:.0f}",
            e.reused,
        )
        for e in result.engines
    ]
    headers = (
        "engine",
        "address",
        "prepare ms",
        "load ms",
        "warm-up ms",
        "commit ms",
        "switch µs",
        "reused",
    )
    data = {"pipeline": pipeline.name(), **dataclasses.asdict(result)}
    return Output(data, text + "\n" + grid_text(headers, rows))


def pipeline_deploy(args: argparse.Namespace) -> Output:
    with _client(args) as wl:
        pipeline = wl.get_pipeline(args.pipeline)
        versions = pipeline.versions()
        if not versions:
            raise InvalidInputError(
                f"pipeline {args.pipeline!r} has no versions yet: "
                f"`hotswap pipeline add-step {args.pipeline} MODEL` makes one"
            )
        config = DeploymentConfig(replicas=args.replicas or 0)
        pipeline.deploy(version=args.version or versions[-1].number(), deployment_config=config)
        result = pipeline.last_deploy()
        assert result is not None
        return _deploy_output(pipeline, result)


def pipeline_rollback(args: argparse.Namespace) -> Output:
    with _client(args) as wl:
        pipeline = wl.get_pipeline(args.pipeline)
        deployed = pipeline.deployed_version()
        target = args.to
        if target is None:
            if deployed is None or deployed.number() <= 1:
                raise InvalidInputError(
                    f"pipeline {args.pipeline!r} has no earlier version to roll back to; "
                    "pass --to N"
                )
            target = deployed.number() - 1
        pipeline.deploy(version=target)
        result = pipeline.last_deploy()
        assert result is not None
        return _deploy_output(pipeline, result)


def pipeline_undeploy(args: argparse.Namespace) -> Output:
    with _client(args) as wl:
        wl.get_pipeline(args.pipeline).undeploy()
        return Output({"pipeline": args.pipeline, "deployed": False}, f"undeployed {args.pipeline}")


def pipeline_status(args: argparse.Namespace) -> Output:
    with _client(args) as wl:
        status = wl.get_pipeline(args.pipeline).status()
        lines = [f"{args.pipeline}: {status['status']}", *status["details"]]
        rows = [
            (
                e["name"],
                e["address"],
                e["status"],
                e["pipeline_statuses"]["pipelines"][0]["version"],
                ", ".join(m["name"] for m in e["model_statuses"]["models"]),
                e["reason"] or "",
            )
            for e in status["engines"]
        ]
        if rows:
            headers = ("engine", "address", "status", "serving version", "models", "reason")
            lines.append(grid_text(headers, rows))
        rates = [
            (r["version"], f"{r['requests_per_second']:.1f}", f"{r['errors_per_second']:.1f}",
             f"{r['mean_latency_ms']:.2f}")
            for r in status["rates"]
        ]  # fmt: skip
        if rates:
            lines.append(grid_text(("version", "requests/s", "errors/s", "mean ms"), rates))
        if "rollout" in status:
            lines.append(repr(wl.get_pipeline(args.pipeline).rollout_status()))
        return Output(status, "\n".join(lines))


# --- rollouts ----------------------------------------------------------------------------------

# Exit code of `rollout start` (waiting) and `rollout status` when the rollout did not complete.
ROLLOUT_NOT_COMPLETED = 1


def _rollout_output(rollout: Rollout) -> Output:
    ended = rollout.state() not in ("running", "rolling_back", "completed")
    return Output(rollout.to_dict(), repr(rollout), exit_code=ROLLOUT_NOT_COMPLETED * ended)


def _percents(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidInputError(
            f"--steps takes percents separated by commas (e.g. 5,25,50,100), not {text!r}"
        ) from None


def rollout_start(args: argparse.Namespace) -> Output:
    with _client(args) as wl:
        pipeline = wl.get_pipeline(args.pipeline)
        model = wl.get_model(args.model, version=args.model_version)
        rollout = pipeline.rollout(
            model,
            steps=_percents(args.steps),
            step_seconds=args.step_seconds,
            max_error_rate=args.max_error_rate,
            max_latency_ratio=args.max_latency_ratio,
            index=args.index,
            min_requests=args.min_requests,
        )
        if not args.no_wait:
            rollout.wait(args.timeout)
        return _rollout_output(rollout)


def rollout_status(args: argparse.Namespace) -> Output:
    with _client(args) as wl:
        return _rollout_output(wl.get_pipeline(args.pipeline).rollout_status())


def rollout_abort(args: argparse.Namespace) -> Output:
    with _client(args) as wl:
        rollout = wl.get_pipeline(args.pipeline).abort_rollout(args.reason or "")
        return Output(rollout.to_dict(), repr(rollout))


def pipeline_versions(args: argparse.Namespace) -> Output:
    with _client(args) as wl:
        versions = wl.get_pipeline(args.pipeline).versions()
        data = [{**v.to_dict(), "deployed": v.number() == versions.deployed} for v in versions]
        return Output(data, repr(versions))


# --- inference and demo ------------------------------------------------------------------------


def infer(args: argparse.Namespace) -> Output:
    fmt = args.format or "table"
    if args.output:
        check_result_path(args.output)  # before any work: a typo must not cost an inference
    with _client(args) as wl:
        table, _ = read_table_file(args.input)
        pipeline = wl.get_pipeline(args.pipeline)
        result = pipeline.infer(table, timeout=args.timeout, allow_nan=args.allow_nan)
        served = pipeline.last_served()
    summary = {
        "rows": result.num_rows,
        "pipeline_version": served.pipeline_version if served else None,
        "models": list(served.models) if served else [],
    }
    if args.output:
        write_result(result, args.output)
        version = summary["pipeline_version"]
        text = f"wrote {result.num_rows} rows to {args.output} (pipeline version {version})"
        return Output({**summary, "output": args.output}, text)
    if fmt == "arrow":
        return Output(summary, "", binary=to_ipc(result))
    return Output(table_to_records(result), _render_result(result, fmt, limit=MAX_TABLE_ROWS))


def _render_result(result: Any, fmt: str, *, limit: int | None) -> str:
    if fmt == "json":
        return json.dumps(table_to_records(result), indent=2, default=str)
    shown = result if limit is None else result.slice(0, limit)
    rows = list(zip(*(column_to_python(c) for c in shown.columns), strict=True))
    text = grid_text(result.column_names, rows)
    if shown.num_rows < result.num_rows:
        text += f"\n… {result.num_rows - shown.num_rows} more rows (use --output FILE or --json)"
    return text


def demo(args: argparse.Namespace) -> Output:
    from hotswap.clients._demo import run_demo

    # With --json the narration goes to stderr and stdout gets only the summary.
    code, summary = run_demo(
        Path(args.models), args.address, out=sys.stderr if args.json else sys.stdout
    )
    return Output(summary, "", exit_code=code)
