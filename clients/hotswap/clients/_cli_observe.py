"""``hotswap logs``, ``hotswap swaps`` and ``hotswap engines``: a pipeline's inference logs and
swap timeline, and the fleet."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from hotswap.clients._cli_commands import Output, _client
from hotswap.clients._convert import column_to_python, table_to_records
from hotswap.clients._history import fetch_logs, last_model_name, list_swaps
from hotswap.clients._render import grid_text

FOLLOW_INTERVAL = 1.0


def add_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser(
        "logs",
        help="a pipeline's inference logs, newest first",
        description="A pipeline's inference logs from every engine, newest first.",
        parents=[common],
    )
    p.add_argument("pipeline")
    p.add_argument("--limit", type=int, default=20, help="rows to show (default %(default)s)")
    p.add_argument(
        "--follow",
        action="store_true",
        help="keep printing new rows (oldest first) until Ctrl-C",
    )
    p.set_defaults(func=logs)
    p = sub.add_parser(
        "swaps",
        help="a pipeline's swap timeline, newest first",
        description="Every deploy, rollback and undeploy of a pipeline, newest first.",
        parents=[common],
    )
    p.add_argument("pipeline")
    p.add_argument("--limit", type=int, default=20, help="swaps to show (default %(default)s)")
    p.set_defaults(func=swaps)
    p = sub.add_parser(
        "engines",
        help="the engines the control plane knows, and what each serves",
        description="Every engine the control plane knows: its address, whether it is "
        "connected or lost, draining, its labels and the pipelines it serves.",
        parents=[common],
    )
    p.set_defaults(func=engines)


def engines(args: argparse.Namespace) -> Output:
    with _client(args) as wl:
        found = wl.list_engines()
    if not found:
        return Output(
            [], "no engine has connected: start one with `hotswap engine` or `hotswap up`"
        )
    rows = [
        (
            e["name"],
            e["address"],
            e["state"] + (" (draining)" if e["draining"] else ""),
            ",".join(f"{k}={v}" for k, v in sorted(e["labels"].items())),
            ", ".join(e["serving"]),
        )
        for e in found
    ]
    return Output(found, grid_text(("engine", "address", "state", "labels", "serving"), rows))


def _short(value: Any) -> Any:
    if isinstance(value, list) and len(value) > 3:
        return "[" + ", ".join(str(v) for v in value[:3]) + f", … ({len(value)} values)]"
    return value


def _rows_text(table: pa.Table) -> str:
    names = [n for n in table.column_names if n.startswith(("in.", "out."))]
    headers = ["time", "version", "model", *names, "check_failures"]
    columns: list[list[Any]] = [
        [t.isoformat(sep=" ", timespec="milliseconds") for t in column_to_python(table["time"])],
        column_to_python(table["metadata.pipeline_version"]),
        [last_model_name(v) for v in column_to_python(table["metadata.last_model"])],
        *([_short(v) for v in column_to_python(table[n])] for n in names),
        column_to_python(table["check_failures"]),
    ]
    return grid_text(tuple(headers), list(zip(*columns, strict=True)))


def _records(table: pa.Table) -> list[dict[str, Any]]:
    return table_to_records(table)


def logs(args: argparse.Namespace) -> Output:
    with _client(args) as wl:
        pipeline = wl.get_pipeline(args.pipeline)
        workspace = pipeline.workspace()
        channels = wl._channels
        table, resp = fetch_logs(channels, workspace, args.pipeline, args.limit, None, None)
        if not args.follow:
            text = _rows_text(table) if table.num_rows else f"no inference logs for {args.pipeline}"
            for missing in resp.unreachable:
                text += f"\n(engine not reachable: {missing})"
            return Output(_records(table), text)
        # Follow: print what exists oldest first, then poll for rows newer than the newest seen.
        cursor = _show(table.slice(0, args.limit), args.json, header=True)
        try:
            while True:
                time.sleep(FOLLOW_INTERVAL)
                start = datetime.fromtimestamp((cursor + 1) / 1000, UTC)
                end = datetime.now(UTC) + timedelta(days=1)
                table, _ = fetch_logs(channels, workspace, args.pipeline, 10_000, start, end)
                cursor = max(cursor, _show(table, args.json, header=False))
        except KeyboardInterrupt:  # the way to stop following: not an error
            return Output(None, "", binary=b"")


def _show(table: pa.Table, as_json: bool, *, header: bool) -> int:
    """Prints `table` (newest first) oldest first; returns its newest time in ms (or 0)."""
    if table.num_rows == 0:
        return 0
    oldest_first = table.take(pa.array(range(table.num_rows - 1, -1, -1)))
    if as_json:
        for record in _records(oldest_first):
            print(json.dumps(record, default=str))
    else:
        lines = _rows_text(oldest_first).splitlines()
        print("\n".join(lines if header else lines[2:]))
    sys.stdout.flush()
    newest = table["time"][0].as_py()
    return int(newest.replace(tzinfo=UTC).timestamp() * 1000)


def swaps(args: argparse.Namespace) -> Output:
    with _client(args) as wl:
        pipeline = wl.get_pipeline(args.pipeline)
        found = list_swaps(wl._channels, pipeline.workspace(), args.pipeline, args.limit)
        if not found:
            return Output([], f"no swaps recorded for {args.pipeline}")
        text = repr(found)
        last = found[0]
        if last["engines"]:
            rows = [
                (
                    e["engine"],
                    e["stage"],
                    e["prepare_ms"],
                    e["fetch_ms"],
                    e["load_ms"],
                    e["warmup_ms"],
                    e["commit_ms"],
                    e["switch_us"],
                    e["error"],
                )
                for e in last["engines"]
            ]
            headers = (
                "engine",
                "stage",
                "prepare ms",
                "fetch ms",
                "load ms",
                "warm-up ms",
                "commit ms",
                "switch µs",
                "error",
            )
            text += f"\n\nlatest swap {last['swap_id']}:\n" + grid_text(headers, rows)
        return Output(list(found), text)
