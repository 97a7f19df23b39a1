"""The control plane's metadata store: SQLite in WAL mode with versioned migrations.

Model bytes live in the blob store (``blobs.py``); rows here reference them by sha256. Every
method is one transaction, so a crash leaves either the whole change or none of it.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from hotswap.control.domain import (
    Deployment,
    ModelVersion,
    Pipeline,
    PipelineVersion,
    Split,
    TensorSpec,
    Workspace,
    check_name,
)
from hotswap.control.errors import AlreadyExists, InvalidArgument, NotFound
from hotswap.control.splits import SplitRequest, check_sizes, check_split

# Append only: each entry upgrades the schema by one version (PRAGMA user_version).
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE workspaces (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE models (
        id INTEGER PRIMARY KEY,
        workspace_id INTEGER NOT NULL REFERENCES workspaces(id),
        name TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        UNIQUE (workspace_id, name)
    );
    CREATE TABLE model_versions (
        id TEXT PRIMARY KEY,
        model_id INTEGER NOT NULL REFERENCES models(id),
        seq INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        inputs_json TEXT NOT NULL,
        outputs_json TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        UNIQUE (model_id, seq)
    );
    CREATE TABLE pipelines (
        id INTEGER PRIMARY KEY,
        workspace_id INTEGER NOT NULL REFERENCES workspaces(id),
        name TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL,
        UNIQUE (workspace_id, name)
    );
    CREATE TABLE pipeline_versions (
        id TEXT PRIMARY KEY,
        pipeline_id INTEGER NOT NULL REFERENCES pipelines(id),
        number INTEGER NOT NULL,
        created_ms INTEGER NOT NULL,
        UNIQUE (pipeline_id, number)
    );
    CREATE TABLE pipeline_steps (
        pipeline_version_id TEXT NOT NULL REFERENCES pipeline_versions(id),
        position INTEGER NOT NULL,
        model_version_id TEXT NOT NULL REFERENCES model_versions(id),
        PRIMARY KEY (pipeline_version_id, position)
    );
    CREATE TABLE deployments (
        pipeline_id INTEGER PRIMARY KEY REFERENCES pipelines(id),
        pipeline_version_id TEXT NOT NULL REFERENCES pipeline_versions(id),
        replicas INTEGER NOT NULL,
        engines_json TEXT NOT NULL,
        updated_ms INTEGER NOT NULL
    );
    """,
    # 2: the swap timeline (hotswap.control.timeline). Names rather than ids, so a record
    # reads on its own.
    """
    CREATE TABLE swaps (
        id TEXT PRIMARY KEY,
        workspace TEXT NOT NULL,
        pipeline TEXT NOT NULL,
        kind TEXT NOT NULL,
        version_before INTEGER NOT NULL,
        version_after INTEGER NOT NULL,
        started_ms INTEGER NOT NULL,
        ended_ms INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        reason TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        request_id TEXT NOT NULL,
        engines_json TEXT NOT NULL,
        prepare_ms REAL NOT NULL,
        commit_ms REAL NOT NULL
    );
    CREATE INDEX swaps_by_pipeline ON swaps (workspace, pipeline, started_ms);
    """,
    # 3: steps of several models (splits and shadow deploys), what made a swap (a rollout's
    # decision), and rollouts (hotswap.control.rollout), whose record is one JSON document.
    """
    CREATE TABLE pipeline_splits (
        pipeline_version_id TEXT NOT NULL REFERENCES pipeline_versions(id),
        position INTEGER NOT NULL,
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        PRIMARY KEY (pipeline_version_id, position)
    );
    CREATE TABLE pipeline_split_models (
        pipeline_version_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        arm INTEGER NOT NULL,
        model_version_id TEXT NOT NULL REFERENCES model_versions(id),
        weight REAL NOT NULL,
        key_value TEXT NOT NULL,
        PRIMARY KEY (pipeline_version_id, position, arm),
        FOREIGN KEY (pipeline_version_id, position)
            REFERENCES pipeline_splits (pipeline_version_id, position)
    );
    ALTER TABLE swaps ADD COLUMN note TEXT NOT NULL DEFAULT '';
    CREATE TABLE rollouts (
        id TEXT PRIMARY KEY,
        workspace TEXT NOT NULL,
        pipeline TEXT NOT NULL,
        state TEXT NOT NULL,
        started_ms INTEGER NOT NULL,
        record_json TEXT NOT NULL
    );
    CREATE INDEX rollouts_by_pipeline ON rollouts (workspace, pipeline, started_ms);
    """,
)


def now_ms() -> int:
    return int(time.time() * 1000)


def _specs_to_json(specs: Sequence[TensorSpec]) -> str:
    return json.dumps([{"name": s.name, "type": s.type, "shape": list(s.shape)} for s in specs])


def _specs_from_json(text: str) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(d["name"], d["type"], tuple(d["shape"])) for d in json.loads(text))


class Store:
    """Workspaces, model versions, pipelines, pipeline versions and deployments in SQLite."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a deploy's commit point must survive power loss, not only a process crash.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def close(self) -> None:
        self._db.close()

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        current = self.schema_version
        if current > len(MIGRATIONS):
            raise RuntimeError(
                f"database schema version {current} is newer than this hotswap "
                f"({len(MIGRATIONS)}); upgrade hotswap"
            )
        for number, script in enumerate(MIGRATIONS[current:], start=current + 1):
            with self._tx():
                for statement in script.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {number}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- workspaces -----------------------------------------------------------------------

    def create_workspace(self, name: str) -> Workspace:
        check_name("workspace", name)
        created = now_ms()
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO workspaces (name, created_ms) VALUES (?, ?)", (name, created)
                )
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"workspace {name!r} already exists") from None
        return Workspace(name, created)

    def list_workspaces(self) -> list[Workspace]:
        rows = self._db.execute("SELECT name, created_ms FROM workspaces ORDER BY id")
        return [Workspace(r["name"], r["created_ms"]) for r in rows]

    def _workspace_id(self, name: str) -> int:
        row = self._db.execute("SELECT id FROM workspaces WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"workspace {name!r} not found")
        return int(row["id"])

    # -- models ---------------------------------------------------------------------------

    def add_model_version(
        self,
        workspace: str,
        name: str,
        sha256: str,
        size_bytes: int,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
    ) -> ModelVersion:
        """Records a new version of `name` (creating the model on first upload)."""
        check_name("model", name)
        created = now_ms()
        version = str(uuid.uuid4())
        with self._tx() as db:
            ws_id = self._workspace_id(workspace)
            db.execute(
                "INSERT OR IGNORE INTO models (workspace_id, name, created_ms) VALUES (?, ?, ?)",
                (ws_id, name, created),
            )
            model_id = db.execute(
                "SELECT id FROM models WHERE workspace_id = ? AND name = ?", (ws_id, name)
            ).fetchone()["id"]
            seq = db.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM model_versions WHERE model_id = ?",
                (model_id,),
            ).fetchone()[0]
            db.execute(
                "INSERT INTO model_versions (id, model_id, seq, sha256, size_bytes, inputs_json,"
                " outputs_json, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    version,
                    model_id,
                    seq,
                    sha256,
                    size_bytes,
                    _specs_to_json(inputs),
                    _specs_to_json(outputs),
                    created,
                ),
            )
        return ModelVersion(
            workspace, name, version, sha256, size_bytes, tuple(inputs), tuple(outputs), created
        )

    _MODEL_VERSION_SELECT = (
        "SELECT w.name AS workspace, m.name AS name, v.id AS version, v.sha256, v.size_bytes,"
        " v.inputs_json, v.outputs_json, v.created_ms, v.seq"
        " FROM model_versions v JOIN models m ON m.id = v.model_id"
        " JOIN workspaces w ON w.id = m.workspace_id"
    )

    @staticmethod
    def _model_version(row: sqlite3.Row) -> ModelVersion:
        return ModelVersion(
            workspace=row["workspace"],
            name=row["name"],
            version=row["version"],
            sha256=row["sha256"],
            size_bytes=row["size_bytes"],
            inputs=_specs_from_json(row["inputs_json"]),
            outputs=_specs_from_json(row["outputs_json"]),
            created_ms=row["created_ms"],
        )

    def model_versions(self, workspace: str, name: str) -> list[ModelVersion]:
        """Every version of one model, oldest first."""
        self._workspace_id(workspace)
        rows = self._db.execute(
            self._MODEL_VERSION_SELECT + " WHERE w.name = ? AND m.name = ? ORDER BY v.seq",
            (workspace, name),
        ).fetchall()
        if not rows:
            raise NotFound(f"model {name!r} not found in workspace {workspace!r}")
        return [self._model_version(r) for r in rows]

    def list_models(self, workspace: str) -> list[tuple[ModelVersion, int]]:
        """Each model's latest version with its version count, in upload order."""
        ws_id = self._workspace_id(workspace)
        rows = self._db.execute(
            self._MODEL_VERSION_SELECT + " WHERE m.workspace_id = ? ORDER BY m.id, v.seq",
            (ws_id,),
        ).fetchall()
        latest: dict[str, sqlite3.Row] = {}
        counts: dict[str, int] = {}
        for r in rows:
            latest[r["name"]] = r
            counts[r["name"]] = counts.get(r["name"], 0) + 1
        return [(self._model_version(r), counts[name]) for name, r in latest.items()]

    def resolve_model_version(self, workspace: str, name: str, version: str) -> ModelVersion:
        versions = self.model_versions(workspace, name)
        if not version:
            return versions[-1]
        for v in versions:
            if v.version == version:
                return v
        raise NotFound(f"model {name!r} has no version {version!r}")

    # -- pipelines ------------------------------------------------------------------------

    def create_pipeline(self, workspace: str, name: str) -> Pipeline:
        check_name("pipeline", name)
        created = now_ms()
        try:
            with self._tx() as db:
                ws_id = self._workspace_id(workspace)
                db.execute(
                    "INSERT INTO pipelines (workspace_id, name, created_ms, updated_ms)"
                    " VALUES (?, ?, ?, ?)",
                    (ws_id, name, created, created),
                )
        except sqlite3.IntegrityError:
            raise AlreadyExists(
                f"pipeline {name!r} already exists in workspace {workspace!r}"
            ) from None
        return Pipeline(workspace, name, created, created, 0, None)

    def _pipeline_row(self, workspace: str, name: str) -> sqlite3.Row:
        ws_id = self._workspace_id(workspace)
        row = self._db.execute(
            "SELECT * FROM pipelines WHERE workspace_id = ? AND name = ?", (ws_id, name)
        ).fetchone()
        if row is None:
            raise NotFound(f"pipeline {name!r} not found in workspace {workspace!r}")
        return row  # type: ignore[no-any-return]

    def get_pipeline(self, workspace: str, name: str) -> Pipeline:
        row = self._pipeline_row(workspace, name)
        count = self._db.execute(
            "SELECT COUNT(*) FROM pipeline_versions WHERE pipeline_id = ?", (row["id"],)
        ).fetchone()[0]
        return Pipeline(
            workspace,
            name,
            row["created_ms"],
            row["updated_ms"],
            int(count),
            self._deployment(row["id"], workspace, name),
        )

    def list_pipelines(self, workspace: str) -> list[Pipeline]:
        ws_id = self._workspace_id(workspace)
        names = self._db.execute(
            "SELECT name FROM pipelines WHERE workspace_id = ? ORDER BY id", (ws_id,)
        ).fetchall()
        return [self.get_pipeline(workspace, r["name"]) for r in names]

    def create_pipeline_version(
        self,
        workspace: str,
        pipeline: str,
        steps: Sequence[tuple[str, str]],
        splits: Sequence[SplitRequest] = (),
    ) -> PipelineVersion:
        """Makes a new immutable version from (model name, model version or "") pairs, and
        the steps of several models among them (`splits`)."""
        if not steps:
            raise InvalidArgument("a pipeline version needs at least one step")
        check_sizes(len(steps), splits)
        known: dict[tuple[str, str], ModelVersion] = {}

        def resolve(name: str, version: str) -> ModelVersion:
            found = known.get((name, version))
            if found is None:
                found = known[(name, version)] = self.resolve_model_version(
                    workspace, name, version
                )
            return found

        models = tuple(resolve(m, v) for m, v in steps)
        resolved = tuple(
            Split(
                s.step,
                s.kind,
                tuple(resolve(m, v) for m, v in s.models),
                tuple(s.weights),
                s.key,
                tuple(s.key_values),
            )
            for s in sorted(splits, key=lambda s: s.step)
        )
        for i, split in enumerate(resolved):
            if i and resolved[i - 1].step == split.step:
                raise InvalidArgument(f"step {split.step} has two splits: give it one")
            check_split(split, models)
        created = now_ms()
        version_id = str(uuid.uuid4())
        with self._tx() as db:
            row = self._pipeline_row(workspace, pipeline)
            number = db.execute(
                "SELECT COALESCE(MAX(number), 0) + 1 FROM pipeline_versions WHERE pipeline_id = ?",
                (row["id"],),
            ).fetchone()[0]
            db.execute(
                "INSERT INTO pipeline_versions (id, pipeline_id, number, created_ms)"
                " VALUES (?, ?, ?, ?)",
                (version_id, row["id"], number, created),
            )
            db.executemany(
                "INSERT INTO pipeline_steps (pipeline_version_id, position, model_version_id)"
                " VALUES (?, ?, ?)",
                [(version_id, i, m.version) for i, m in enumerate(models)],
            )
            for split in resolved:
                db.execute(
                    "INSERT INTO pipeline_splits (pipeline_version_id, position, kind, key)"
                    " VALUES (?, ?, ?, ?)",
                    (version_id, split.step, split.kind, split.key),
                )
                db.executemany(
                    "INSERT INTO pipeline_split_models (pipeline_version_id, position, arm,"
                    " model_version_id, weight, key_value) VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (
                            version_id,
                            split.step,
                            arm,
                            m.version,
                            split.weights[arm] if split.weights else 0.0,
                            split.key_values[arm - 1] if split.key_values and arm else "",
                        )
                        for arm, m in enumerate(split.models)
                    ],
                )
            db.execute("UPDATE pipelines SET updated_ms = ? WHERE id = ?", (created, row["id"]))
        return PipelineVersion(
            workspace, pipeline, version_id, int(number), models, created, resolved
        )

    def _pipeline_version_by_id(
        self, version_id: str, workspace: str, name: str
    ) -> PipelineVersion:
        row = self._db.execute(
            "SELECT number, created_ms FROM pipeline_versions WHERE id = ?", (version_id,)
        ).fetchone()
        steps = self._db.execute(
            self._MODEL_VERSION_SELECT + " JOIN pipeline_steps s ON s.model_version_id = v.id"
            " WHERE s.pipeline_version_id = ? ORDER BY s.position",
            (version_id,),
        ).fetchall()
        return PipelineVersion(
            workspace,
            name,
            version_id,
            int(row["number"]),
            tuple(self._model_version(s) for s in steps),
            int(row["created_ms"]),
            self._splits(version_id),
        )

    def _splits(self, version_id: str) -> tuple[Split, ...]:
        splits = []
        for row in self._db.execute(
            "SELECT position, kind, key FROM pipeline_splits WHERE pipeline_version_id = ?"
            " ORDER BY position",
            (version_id,),
        ).fetchall():
            arms = self._db.execute(
                self._MODEL_VERSION_SELECT.replace(" FROM", ", s.weight, s.key_value FROM", 1)
                + " JOIN pipeline_split_models s ON s.model_version_id = v.id"
                " WHERE s.pipeline_version_id = ? AND s.position = ? ORDER BY s.arm",
                (version_id, row["position"]),
            ).fetchall()
            kind = row["kind"]
            splits.append(
                Split(
                    int(row["position"]),
                    kind,
                    tuple(self._model_version(a) for a in arms),
                    tuple(float(a["weight"]) for a in arms) if kind == "random" else (),
                    row["key"],
                    tuple(a["key_value"] for a in arms[1:]) if kind == "key" else (),
                )
            )
        return tuple(splits)

    # -- rollouts -------------------------------------------------------------------------

    def save_rollout(
        self, rollout_id: str, workspace: str, pipeline: str, state: str, started_ms: int,
        record: dict[str, object],
    ) -> None:  # fmt: skip
        """Writes a rollout's whole record (`hotswap.control.rollout`), replacing the last."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO rollouts (id, workspace, pipeline, state, started_ms, record_json)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
                " state = excluded.state, record_json = excluded.record_json",
                (rollout_id, workspace, pipeline, state, started_ms, json.dumps(record)),
            )

    def rollouts(
        self,
        workspace: str = "",
        pipeline: str = "",
        states: Sequence[str] = (),
        rollout_id: str = "",
        limit: int = -1,
    ) -> list[dict[str, object]]:
        """Rollout records, newest first: of a pipeline ("" for every one), in `states` (any
        when empty), with an id ("" for any), at most `limit` (-1: all)."""
        wanted = list(states)
        rows = self._db.execute(
            "SELECT record_json FROM rollouts WHERE (? = '' OR workspace = ?)"
            " AND (? = '' OR pipeline = ?) AND (? = '' OR id = ?)"
            f" AND (? = 0 OR state IN ({', '.join('?' * len(wanted)) or 'NULL'}))"
            " ORDER BY started_ms DESC, rowid DESC LIMIT ?",
            (
                workspace,
                workspace,
                pipeline,
                pipeline,
                rollout_id,
                rollout_id,
                len(wanted),
                *wanted,
                limit,
            ),
        ).fetchall()
        return [json.loads(r["record_json"]) for r in rows]

    def pipeline_versions(
        self, workspace: str, pipeline: str, *, after: int = 0, limit: int = -1
    ) -> list[PipelineVersion]:
        """Versions numbered above `after`, oldest first, at most `limit` (-1: all)."""
        row = self._pipeline_row(workspace, pipeline)
        ids = self._db.execute(
            "SELECT id FROM pipeline_versions WHERE pipeline_id = ? AND number > ?"
            " ORDER BY number LIMIT ?",
            (row["id"], after, limit),
        ).fetchall()
        return [self._pipeline_version_by_id(r["id"], workspace, pipeline) for r in ids]

    def has_blob(self, sha256: str) -> bool:
        """Whether any stored model version has these bytes."""
        found = self._db.execute(
            "SELECT 1 FROM model_versions WHERE sha256 = ? LIMIT 1", (sha256,)
        ).fetchone()
        return found is not None

    def pipeline_version(self, workspace: str, pipeline: str, number: int) -> PipelineVersion:
        """Version `number` of a pipeline; 0 means the latest."""
        row = self._pipeline_row(workspace, pipeline)
        if number == 0:
            found = self._db.execute(
                "SELECT id FROM pipeline_versions WHERE pipeline_id = ?"
                " ORDER BY number DESC LIMIT 1",
                (row["id"],),
            ).fetchone()
            if found is None:
                raise NotFound(
                    f"pipeline {pipeline!r} has no versions yet: add a step and create one first"
                )
        else:
            found = self._db.execute(
                "SELECT id FROM pipeline_versions WHERE pipeline_id = ? AND number = ?",
                (row["id"], number),
            ).fetchone()
            if found is None:
                raise NotFound(f"pipeline {pipeline!r} has no version {number}")
        return self._pipeline_version_by_id(found["id"], workspace, pipeline)

    # -- deployments ----------------------------------------------------------------------

    def _deployment(self, pipeline_id: int, workspace: str, name: str) -> Deployment | None:
        row = self._db.execute(
            "SELECT * FROM deployments WHERE pipeline_id = ?", (pipeline_id,)
        ).fetchone()
        if row is None:
            return None
        return Deployment(
            self._pipeline_version_by_id(row["pipeline_version_id"], workspace, name),
            int(row["replicas"]),
            tuple(json.loads(row["engines_json"])),
        )

    def set_deployment(
        self, version: PipelineVersion, replicas: int, engines: Sequence[str]
    ) -> Deployment:
        """The commit point of a deploy: from here on `version` is the desired state."""
        updated = now_ms()
        with self._tx() as db:
            row = self._pipeline_row(version.workspace, version.pipeline)
            db.execute(
                "INSERT INTO deployments (pipeline_id, pipeline_version_id, replicas,"
                " engines_json, updated_ms) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (pipeline_id) DO UPDATE SET"
                " pipeline_version_id = excluded.pipeline_version_id,"
                " replicas = excluded.replicas, engines_json = excluded.engines_json,"
                " updated_ms = excluded.updated_ms",
                (row["id"], version.version_id, replicas, json.dumps(list(engines)), updated),
            )
            db.execute("UPDATE pipelines SET updated_ms = ? WHERE id = ?", (updated, row["id"]))
        return Deployment(version, replicas, tuple(engines))

    def delete_deployment(self, workspace: str, pipeline: str) -> Deployment | None:
        """Removes the deployment; returns what it was (None when not deployed)."""
        with self._tx() as db:
            row = self._pipeline_row(workspace, pipeline)
            previous = self._deployment(row["id"], workspace, pipeline)
            db.execute("DELETE FROM deployments WHERE pipeline_id = ?", (row["id"],))
            db.execute("UPDATE pipelines SET updated_ms = ? WHERE id = ?", (now_ms(), row["id"]))
        return previous

    def deployments(self) -> list[Deployment]:
        """Every live deployment, across workspaces."""
        rows = self._db.execute(
            "SELECT d.pipeline_id, p.name, w.name AS workspace FROM deployments d"
            " JOIN pipelines p ON p.id = d.pipeline_id JOIN workspaces w ON w.id = p.workspace_id"
            " ORDER BY d.pipeline_id"
        ).fetchall()
        found = (self._deployment(r["pipeline_id"], r["workspace"], r["name"]) for r in rows)
        return [d for d in found if d is not None]
