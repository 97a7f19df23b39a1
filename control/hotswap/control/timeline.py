"""The swap timeline: every deploy, rollback and undeploy, with per-engine stages and timings.

A swap is written when it starts (outcome "running") and rewritten when it ends, so a control
plane that dies mid-swap leaves a record; the next start marks such records "interrupted". The
table lives in the control plane's SQLite database (migration 2 in ``store.py``), on a
connection of its own: records are observability, so they are written with
``synchronous=NORMAL`` and never inside the deploy's commit-point transaction.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(slots=True)
class EngineStage:
    """One engine's part in a swap (mutable while the swap runs)."""

    engine: str
    address: str
    stage: str = "preparing"
    prepare_ms: float = 0.0
    fetch_ms: float = 0.0
    load_ms: float = 0.0
    warmup_ms: float = 0.0
    commit_ms: float = 0.0
    switch_us: float = 0.0
    # The engine's wall-clock instant of the switch (Unix µs; 0 until it switched).
    switched_at_us: int = 0
    reused: bool = False
    error: str = ""


@dataclass(slots=True)
class Swap:
    """One swap: live while it runs (``outcome == "running"``), then a finished record."""

    swap_id: str
    workspace: str
    pipeline: str
    kind: str  # deploy | rollback | redeploy | undeploy
    version_before: int
    version_after: int
    requested_by: str = ""
    request_id: str = ""
    started_ms: int = field(default_factory=now_ms)
    ended_ms: int = 0
    outcome: str = "running"  # ok | aborted | rejected | running | interrupted
    reason: str = ""
    engines: dict[str, EngineStage] = field(default_factory=dict)
    prepare_ms: float = 0.0
    commit_ms: float = 0.0
    # What made the swap when it was not a person's deploy (a rollout step and its numbers).
    note: str = ""
    # Past the commit point (the store names the new version); not persisted.
    committed: bool = False

    def finish(self, outcome: str, reason: str = "") -> None:
        self.outcome = outcome
        self.reason = reason
        self.ended_ms = now_ms()
        for stage in self.engines.values():
            if stage.stage in ("preparing", "prepared", "committing") and outcome != "ok":
                stage.stage = "cancelled"


def swap_kind(before: int, after: int) -> str:
    if after == 0:
        return "undeploy"
    if before == 0 or after > before:
        return "deploy"
    return "rollback" if after < before else "redeploy"


class SwapTimeline:
    """Reads and writes swap records. Open it after ``Store`` (which applies the migration).

    Each pipeline keeps its newest `keep` records: a deploy loop cannot grow the file forever.
    """

    def __init__(self, path: Path, keep: int = 1000) -> None:
        self.keep = keep
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "UPDATE swaps SET outcome = 'interrupted', ended_ms = ?,"
            " reason = 'the control plane stopped during the swap' WHERE outcome = 'running'",
            (now_ms(),),
        )

    def close(self) -> None:
        self._db.close()

    def write(self, swap: Swap) -> None:
        """Inserts or replaces the record of `swap`."""
        self._db.execute(
            "INSERT OR REPLACE INTO swaps (id, workspace, pipeline, kind, version_before,"
            " version_after, started_ms, ended_ms, outcome, reason, requested_by, request_id,"
            " engines_json, prepare_ms, commit_ms, note)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                swap.swap_id,
                swap.workspace,
                swap.pipeline,
                swap.kind,
                swap.version_before,
                swap.version_after,
                swap.started_ms,
                swap.ended_ms,
                swap.outcome,
                swap.reason,
                swap.requested_by,
                swap.request_id,
                json.dumps([asdict(e) for e in swap.engines.values()]),
                swap.prepare_ms,
                swap.commit_ms,
                swap.note,
            ),
        )
        if swap.outcome != "running":
            self._db.execute(
                "DELETE FROM swaps WHERE workspace = ? AND pipeline = ? AND rowid NOT IN"
                " (SELECT rowid FROM swaps WHERE workspace = ? AND pipeline = ?"
                " ORDER BY started_ms DESC, rowid DESC LIMIT ?)",
                (swap.workspace, swap.pipeline, swap.workspace, swap.pipeline, self.keep),
            )

    def list(self, workspace: str, pipeline: str, limit: int = 100) -> list[Swap]:
        """The pipeline's swaps, newest first."""
        rows = self._db.execute(
            "SELECT * FROM swaps WHERE workspace = ? AND pipeline = ?"
            " ORDER BY started_ms DESC, rowid DESC LIMIT ?",
            (workspace, pipeline, limit if limit > 0 else 100),
        ).fetchall()
        return [_from_row(r) for r in rows]


def _from_row(row: sqlite3.Row) -> Swap:
    engines = [EngineStage(**e) for e in json.loads(row["engines_json"])]
    return Swap(
        swap_id=row["id"],
        workspace=row["workspace"],
        pipeline=row["pipeline"],
        kind=row["kind"],
        version_before=int(row["version_before"]),
        version_after=int(row["version_after"]),
        requested_by=row["requested_by"],
        request_id=row["request_id"],
        started_ms=int(row["started_ms"]),
        ended_ms=int(row["ended_ms"]),
        outcome=row["outcome"],
        reason=row["reason"],
        engines={e.engine: e for e in engines},
        prepare_ms=float(row["prepare_ms"]),
        commit_ms=float(row["commit_ms"]),
        note=row["note"],
    )
