"""The ``hotswap`` command line: servers (``up``, ``control``, ``engine``), the SDK's operations
as subcommands, and the demo.

Exit codes: 0 success; 1 the server refused or failed (message on stderr); 2 bad usage
(argparse); 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from hotswap.clients import _cli_commands as commands
from hotswap.clients import _cli_observe

# Subcommands that hand their arguments to another program's main(argv) untouched.
_PASSTHROUGH = {
    "up": "run a control plane and N engines on this machine (hotswap up --help)",
    "control": "run the control plane (hotswap control --help)",
    "engine": "run an engine (hotswap engine --help)",
    "loadtest": "drive load at a pipeline, optionally while swapping (hotswap loadtest --help)",
}


def _run_passthrough(name: str, argv: list[str]) -> int:
    if name == "up":
        from hotswap.clients._stack import main_up

        return main_up(argv)
    if name == "loadtest":
        from hotswap.clients.loadtest import main as loadtest_main

        return loadtest_main(argv)
    if name == "control":
        from hotswap.control.__main__ import main as control_main

        return control_main(argv)
    from hotswap.engine.__main__ import main as engine_main

    return engine_main(argv)


def _common() -> argparse.ArgumentParser:
    """Options accepted before or after the subcommand (``hotswap model list --json``)."""
    parent = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's default must not overwrite a value given before it.
    parent.add_argument(
        "--address",
        default=argparse.SUPPRESS,
        help="control plane host:port (default $HOTSWAP_ADDRESS, else localhost:50051)",
    )
    parent.add_argument(
        "--workspace",
        default=argparse.SUPPRESS,
        help="workspace to work in (default $HOTSWAP_WORKSPACE, else 'default')",
    )
    parent.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON for scripts"
    )
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for tests and docs)."""
    common = _common()
    parser = argparse.ArgumentParser(
        prog="hotswap",
        description="Serve ONNX models and hot-swap them behind a live pipeline.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(
        subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        help_: str,
        func: Callable[[argparse.Namespace], commands.Output] | None,
    ) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, help=help_, description=help_, parents=[common])
        if func is not None:
            p.set_defaults(func=func)
        return p

    for name, help_ in _PASSTHROUGH.items():
        p = sub.add_parser(name, help=help_, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)

    ws = add(sub, "workspace", "create and list workspaces", None)
    ws_sub = ws.add_subparsers(dest="action", metavar="ACTION", required=True)
    add(ws_sub, "create", "create a workspace", commands.workspace_create).add_argument("name")
    add(ws_sub, "list", "list workspaces", commands.workspace_list)

    model = add(sub, "model", "upload and inspect models", None)
    model_sub = model.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = add(
        model_sub, "upload", "upload an ONNX file as a new model version", commands.model_upload
    )
    p.add_argument("name", help="model name (an existing name gets a new version)")
    p.add_argument("file", help="the .onnx file")
    add(model_sub, "list", "list the workspace's models", commands.model_list)
    p = add(model_sub, "show", "show a model and its versions", commands.model_show)
    p.add_argument("name")

    pipe = add(sub, "pipeline", "build, deploy, hot-swap and roll back pipelines", None)
    ps = pipe.add_subparsers(dest="action", metavar="ACTION", required=True)
    add(ps, "create", "create an empty pipeline", commands.pipeline_create).add_argument("name")
    add(ps, "list", "list the workspace's pipelines", commands.pipeline_list)
    p = add(ps, "add-step", "make a new version with one more step", commands.pipeline_add_step)
    p.add_argument("pipeline")
    p.add_argument("model")
    p.add_argument("--model-version", help="model version id (default: latest)")
    p = add(
        ps, "replace-step", "make a new version with step INDEX replaced", commands.pipeline_replace
    )
    p.add_argument("pipeline")
    p.add_argument("index", type=int, help="0-based step index")
    p.add_argument("model")
    p.add_argument("--model-version", help="model version id (default: latest)")
    p = add(
        ps, "deploy", "deploy (hot-swap to) the latest or a given version", commands.pipeline_deploy
    )
    p.add_argument("pipeline")
    p.add_argument("--version", type=int, help="version number (default: latest)")
    p.add_argument("--replicas", type=int, help="engines to serve on (default: keep, or 1)")
    add(ps, "undeploy", "stop serving a pipeline", commands.pipeline_undeploy).add_argument(
        "pipeline"
    )
    add(ps, "status", "the deployment's live state", commands.pipeline_status).add_argument(
        "pipeline"
    )
    add(ps, "versions", "list a pipeline's versions", commands.pipeline_versions).add_argument(
        "pipeline"
    )
    p = add(ps, "rollback", "hot-swap back to an older version", commands.pipeline_rollback)
    p.add_argument("pipeline")
    p.add_argument("--to", type=int, help="version number (default: the one before the deployed)")

    ro = add(
        sub, "rollout", "move traffic to a new model step by step, rolling back by itself", None
    )
    ro_sub = ro.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = add(
        ro_sub,
        "start",
        "start a rollout and follow it to its end (exit 1 unless it completes)",
        commands.rollout_start,
    )
    p.add_argument("pipeline")
    p.add_argument("model", help="the new model (the challenger)")
    p.add_argument("--model-version", help="model version id (default: latest)")
    p.add_argument("--index", type=int, default=0, help="the step it replaces (default 0)")
    p.add_argument(
        "--steps", default="5,25,50,100", help="percent of rows at each step (%(default)s)"
    )
    p.add_argument("--step-seconds", type=float, default=60, help="seconds a step lasts (60)")
    p.add_argument(
        "--max-error-rate", type=float, default=0.01, help="fraction that may fail (0.01)"
    )
    p.add_argument(
        "--max-latency-ratio",
        type=float,
        default=1.5,
        help="most time a row, as a multiple of the current model's (1.5)",
    )
    p.add_argument(
        "--min-requests", type=int, default=20, help="challenger requests a step needs (20)"
    )
    p.add_argument("--no-wait", action="store_true", help="return once the first step is live")
    p.add_argument("--timeout", type=float, help="give up following after this many seconds")
    p = add(ro_sub, "status", "the pipeline's newest rollout", commands.rollout_status)
    p.add_argument("pipeline")
    p = add(ro_sub, "abort", "stop the running rollout and swap back", commands.rollout_abort)
    p.add_argument("pipeline")
    p.add_argument("--reason", help="why, for the swap timeline")

    p = add(sub, "infer", "run a deployed pipeline on a file", commands.infer)
    p.add_argument("pipeline")
    p.add_argument("--input", required=True, help=".arrow (IPC file or stream) or .df.json")
    p.add_argument(
        "--output",
        help="write every row here, in the format its suffix names: .csv, .json (pandas "
        "records), .arrow (IPC file) or .parquet",
    )
    p.add_argument(
        "--format",
        choices=("table", "json", "arrow"),
        help="how to print the result on stdout (default table; --json is the same as json)",
    )
    p.add_argument(
        "--allow-nan",
        action="store_true",
        help="send NaN/inf inputs as they are (refused by default; some models read NaN as "
        "'missing')",
    )
    p.add_argument("--timeout", type=float, help="seconds per request (default 15)")

    _cli_observe.add_parsers(sub, common)

    p = add(sub, "demo", "run the hot-swap tutorial end to end", commands.demo)
    p.add_argument(
        "--models",
        default="examples/housing/models",
        help="folder with rf/gbr/xgb_model.onnx and houses-2.df.json (default %(default)s)",
    )
    p.epilog = (
        "Without --address the demo starts its own control plane and engine, then stops them."
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``hotswap`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in _PASSTHROUGH:
        return _run_passthrough(args_list[0], args_list[1:])
    parser = build_parser()
    args = parser.parse_args(args_list)
    # Not parser.set_defaults: the shared option actions would take that default everywhere.
    for name, default in (("address", None), ("workspace", None), ("json", False)):
        if not hasattr(args, name):
            setattr(args, name, default)
    if args.command in _PASSTHROUGH:
        return _run_passthrough(args.command, list(args.rest))
    if args.workspace is None:
        args.workspace = os.environ.get("HOTSWAP_WORKSPACE") or None
    try:
        output: commands.Output = args.func(args)
        commands.emit(output, as_json=args.json)
    except commands.HotswapError as err:
        print(f"hotswap: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hotswap: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `hotswap ... | head`
        sys.stderr.close()
        return 0
    return output.exit_code


if __name__ == "__main__":
    sys.exit(main())
