"""The ``hotswap`` CLI: every subcommand has --help, and commands round-trip against a live
stack with --json parsed."""

from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.ipc
import pyarrow.parquet
import pytest

from hotswap.clients._stack import LocalStack
from hotswap.clients.cli import build_parser, main
from tests._terminal import in_terminal

_names = (f"cli{i}" for i in itertools.count())

SUBCOMMANDS = [
    [],
    ["workspace"], ["workspace", "create"], ["workspace", "list"],
    ["model"], ["model", "upload"], ["model", "list"], ["model", "show"],
    ["pipeline"], *(["pipeline", a] for a in (
        "create", "list", "add-step", "replace-step", "deploy", "undeploy", "status", "versions",
        "rollback",
    )),
    ["infer"], ["demo"], ["engines"], ["swaps"], ["logs"],
    ["rollout"], ["rollout", "start"], ["rollout", "status"], ["rollout", "abort"],
]  # fmt: skip


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=lambda w: " ".join(w) or "hotswap")
def test_every_subcommand_has_help(words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*words, "--help"])
    assert info.value.code == 0
    assert "usage: hotswap" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["pipeline", "deploy"])
    assert info.value.code == 2
    assert "required: pipeline" in capsys.readouterr().err


def test_global_options_work_before_and_after_the_subcommand() -> None:
    parser = build_parser()
    before = parser.parse_args(["--json", "--address", "h:1", "model", "list"])
    after = parser.parse_args(["model", "list", "--json", "--address", "h:1"])
    assert (before.json, before.address) == (after.json, after.address) == (True, "h:1")
    assert not hasattr(parser.parse_args(["model", "list"]), "json")  # main() fills it in


def _run(*args: str, address: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOTSWAP_ADDRESS": address}
    proc = subprocess.run(
        [sys.executable, "-m", "hotswap.clients.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_server_commands_forward_their_arguments() -> None:
    for command, flag in (("control", "--data-dir"), ("engine", "--control"), ("up", "--engines")):
        proc = _run(command, "--help", address="unused")
        assert flag in proc.stdout, command


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("stack"), engines=1) as running:
        yield running


class Cli:
    def __init__(self, address: str, workspace: str) -> None:
        self.address = address
        self.workspace = workspace

    def json(self, *args: str) -> Any:
        proc = _run(*args, "--json", "--workspace", self.workspace, address=self.address)
        return json.loads(proc.stdout)

    def fails(self, *args: str) -> str:
        proc = _run(*args, "--workspace", self.workspace, address=self.address, check=False)
        assert proc.returncode == 1, proc.stdout
        assert "Traceback" not in proc.stderr
        return proc.stderr


@pytest.fixture
def cli(stack: LocalStack) -> Cli:
    name = next(_names)
    assert _run("workspace", "create", name, "--json", address=stack.control_address)
    return Cli(stack.control_address, name)


def test_engines_lists_the_fleet(cli: Cli, stack: LocalStack) -> None:
    found = cli.json("engines")
    assert [(e["name"], e["address"], e["state"], e["draining"]) for e in found] == [
        ("engine-1", stack.address_of("engine-1"), "Connected", False)
    ]
    text = _run("engines", address=stack.control_address).stdout
    assert "engine-1" in text and "Connected" in text


def test_workspaces_round_trip(cli: Cli) -> None:
    names = [w["name"] for w in cli.json("workspace", "list")]
    assert cli.workspace in names
    err = cli.fails("workspace", "create", cli.workspace)
    assert err.startswith("hotswap: error:") and "already exists" in err


def test_models_round_trip(cli: Cli, assets: Path) -> None:
    model = cli.json("model", "upload", "rf", str(assets / "models" / "rf_model.onnx"))
    assert model["name"] == "rf" and len(model["sha"]) == 64
    assert model["inputs"] == [{"name": "float_input", "type": "tensor(float)", "shape": [-1, 18]}]
    again = cli.json("model", "upload", "rf", str(assets / "models" / "rf_model.onnx"))
    listed = cli.json("model", "list")
    assert [(m["name"], m["version"], m["version_count"]) for m in listed] == [
        ("rf", again["version"], 2)
    ]
    shown = cli.json("model", "show", "rf")
    assert [v["version"] for v in shown["versions"]] == [model["version"], again["version"]]
    assert "not found" in cli.fails("model", "show", "nope")


def test_pipeline_lifecycle_and_infer(cli: Cli, assets: Path, tmp_path: Path) -> None:
    for short in ("rf", "gbr"):
        cli.json("model", "upload", short, str(assets / "models" / f"{short}_model.onnx"))
    assert cli.json("pipeline", "create", "p")["deployed"] is False
    assert "no versions" in cli.fails("pipeline", "deploy", "p")
    v1 = cli.json("pipeline", "add-step", "p", "rf")
    assert (v1["version"], [s["model"] for s in v1["steps"]]) == (1, ["rf"])
    deployed = cli.json("pipeline", "deploy", "p")
    assert (deployed["version"], deployed["previous"]) == (1, 0)
    assert deployed["engines"][0]["prepare_ms"] > 0

    houses = str(assets / "data" / "xtest-1.df.json")
    records = cli.json("infer", "p", "--input", houses)
    assert records[0]["out.variable"] == [718013.7]

    v2 = cli.json("pipeline", "replace-step", "p", "0", "gbr")
    assert [s["model"] for s in v2["steps"]] == ["gbr"]
    swapped = cli.json("pipeline", "deploy", "p")
    assert (swapped["version"], swapped["previous"]) == (2, 1)
    status = cli.json("pipeline", "status", "p")
    assert status["status"] == "Running"
    assert status["engines"][0]["pipeline_statuses"]["pipelines"][0]["version"] == 2
    versions = cli.json("pipeline", "versions", "p")
    assert [(v["version"], v["deployed"]) for v in versions] == [(1, False), (2, True)]

    rolled = cli.json("pipeline", "rollback", "p")
    assert (rolled["version"], rolled["previous"]) == (1, 2)
    again = _run(
        "pipeline", "deploy", "p", "--version", "1", "--workspace", cli.workspace,
        address=cli.address,
    ).stdout  # fmt: skip
    assert "redeployed (it was already live; nothing changed) version 1" in again
    out = tmp_path / "out.arrow"
    summary = cli.json("infer", "p", "--input", houses, "--output", str(out))
    assert summary == {
        "rows": 1,
        "pipeline_version": 1,
        "models": [summary["models"][0]],
        "output": str(out),
    }
    table = pyarrow.ipc.open_file(out).read_all()
    assert table.column_names == ["time", "in.tensor", "out.variable", "check_failures"]
    # Every format keeps every value: the 18 inputs and the output of each row.
    for suffix in (".csv", ".json", ".parquet"):
        path = tmp_path / f"out{suffix}"
        cli.json("infer", "p", "--input", houses, "--output", str(path))
        if suffix == ".csv":
            with path.open() as f:
                row = next(csv.DictReader(f))
            inputs, output = json.loads(row["in.tensor"]), json.loads(row["out.variable"])
        elif suffix == ".json":
            row = json.loads(path.read_text())[0]
            inputs, output = row["in.tensor"], row["out.variable"]
        else:
            got = pyarrow.parquet.read_table(path)
            inputs, output = got["in.tensor"][0].as_py(), got["out.variable"][0].as_py()
        assert len(inputs) == 18 and output == pytest.approx([718013.7]), suffix
    refused = cli.fails("infer", "p", "--input", houses, "--output", str(tmp_path / "out.txt"))
    assert ".csv, .json, .arrow, .parquet" in refused
    assert not (tmp_path / "out.txt").exists()

    text = _run(
        "infer", "p", "--input", houses, "--workspace", cli.workspace,
        address=cli.address,
    ).stdout  # fmt: skip
    assert "out.variable" in text.splitlines()[0] and "[718013.7]" in text

    raw = subprocess.run(
        [sys.executable, "-m", "hotswap.clients.cli", "infer", "p", "--input", houses,
         "--format", "arrow", "--workspace", cli.workspace, "--address", cli.address],
        capture_output=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    assert pyarrow.ipc.open_stream(raw).read_all()["out.variable"].to_pylist() == [[718013.6875]]

    assert cli.json("pipeline", "undeploy", "p") == {"pipeline": "p", "deployed": False}
    assert "not deployed" in cli.fails("infer", "p", "--input", houses)


def test_rollouts_from_the_shell(cli: Cli, assets: Path) -> None:
    for short in ("rf", "gbr"):
        cli.json("model", "upload", short, str(assets / "models" / f"{short}_model.onnx"))
    cli.json("pipeline", "create", "ro")
    cli.json("pipeline", "add-step", "ro", "rf")
    cli.json("pipeline", "deploy", "ro")
    err = cli.fails("rollout", "status", "ro")
    assert "has had no rollout" in err
    assert "increase and end at 100" in cli.fails("rollout", "start", "ro", "gbr", "--steps", "50")
    # No traffic, so --no-wait: the first step is live and the rollout shows in the status.
    started = cli.json("rollout", "start", "ro", "gbr", "--steps", "50,100", "--no-wait")
    assert started["state"] == "running" and started["steps"][0]["percent"] == 50
    status = cli.json("pipeline", "status", "ro")
    assert status["rollout"]["id"] == started["id"]
    assert "is running" in cli.fails("rollout", "start", "ro", "gbr")  # one at a time
    aborted = cli.json("rollout", "abort", "ro", "--reason", "from the shell")
    assert aborted["state"] == "aborted" and "from the shell" in aborted["reason"]
    assert aborted["final_version"] == aborted["baseline_version"] == 1
    # Following a rollout that does not complete exits 1, with the record on stdout.
    proc = _run("rollout", "status", "ro", "--workspace", cli.workspace,
                address=cli.address, check=False)  # fmt: skip
    assert proc.returncode == 1 and "aborted" in proc.stdout


def test_unknown_workspace_says_how_to_create_it(cli: Cli) -> None:
    proc = _run("model", "list", "--workspace", "nowhere", address=cli.address, check=False)
    assert proc.returncode == 1
    assert "hotswap workspace create nowhere" in proc.stderr


def test_unreachable_server_exits_1_with_a_message() -> None:
    proc = _run("workspace", "list", address="127.0.0.1:1", check=False)
    assert proc.returncode == 1
    assert "cannot reach the control plane at 127.0.0.1:1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_upload_progress_shows_on_a_terminal_only(cli: Cli, assets: Path) -> None:
    model = str(assets / "models" / "gbr_model.onnx")
    command = [sys.executable, "-m", "hotswap.clients.cli", "--address", cli.address]
    command += ["--workspace", cli.workspace, "model", "upload", "gbr", model]
    code, shown = in_terminal(command)
    assert code == 0, shown
    assert "uploading gbr_model.onnx: 100%" in shown  # tqdm's bar, at its end
    piped = _run("model", "upload", "gbr", model, "--workspace", cli.workspace, address=cli.address)
    assert "uploading" not in piped.stderr
