"""The engine's inference log: every answered request, as Arrow rows, in memory then on disk.

The request path only appends a reference to the result table it has already built (plus the
version it ran on and its elapsed time) to a byte-bounded ring: O(1), no copies, no per-row
Python. A background thread (`flush`, driven by `run_forever`) adds the metadata columns,
concatenates, and appends record batches to per-pipeline Arrow IPC stream files that rotate
at `segment_bytes`. Past `disk_bytes` in total, the oldest file goes first; past
`memory_bytes` of unwritten rows, the oldest entry goes first. Both drops are counted.

Log table: ``time``, ``in.<col>``, ``out.<name>``, ``check_failures`` (as the response), then
``metadata.pipeline_version``, ``metadata.pipeline_version_id``, ``metadata.last_model``
(JSON of the last step's model), ``metadata.models`` (JSON of every step's model),
``metadata.elapsed`` (engine nanoseconds for the whole request) and ``metadata.engine``.
A version whose last step is a split names each row's own model in ``metadata.last_model``;
one with a shadow step adds its challengers' columns (`runtime.Shadows`), run by the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from hotswap.engine.runtime import (
    SPLIT_COLUMN,
    Inferred,
    LoadedPipeline,
    LogRows,
    Shadows,
    shadow_columns,
)
from hotswap.service.log_tables import concat_logs

log = logging.getLogger(__name__)

_TIME = pa.timestamp("ms")
_SUFFIX = ".arrow"


@dataclass(frozen=True, slots=True)
class LogSettings:
    directory: Path
    memory_bytes: int = 64 * 1024**2
    disk_bytes: int = 1024**3
    segment_bytes: int = 16 * 1024**2
    flush_interval: float = 1.0


@dataclass(frozen=True, slots=True)
class _Version:
    """A version's metadata values, built once per version (not per request)."""

    key: str
    number: int
    version_id: str
    last_model: str
    models: str
    # When the last step is a random or key split: its entry in `out._model_split` (the
    # row's own last model), else -1 (every row's last model is `last_model`).
    last_split: int = -1


class _Entry(NamedTuple):
    # A tuple, not a dataclass: building one is the whole cost of logging a request.
    version: _Version
    table: LogRows  # built into a record batch by the writer, when it is an `Inferred`
    elapsed_ns: int
    nbytes: int
    source: str = ""  # who sent it ("loadtest" for hotswap loadtest), "" for ordinary traffic
    shadows: Shadows | None = None  # run by the writer: the challengers' columns


@dataclass(slots=True)
class _Segment:
    path: Path
    key: str
    bytes: int = 0
    rows: int = -1  # unknown for files found at start


@dataclass(slots=True)
class _Writer:
    segment: _Segment
    sink: pa.NativeFile
    writer: ipc.RecordBatchStreamWriter
    schema: pa.Schema
    last_write: float = 0.0


# A pipeline's open log file is closed after this long without a row (released pipelines
# must not hold file handles), and at most this many version descriptions are cached.
IDLE_WRITER_SECONDS = 60.0
MAX_CACHED_VERSIONS = 64


@dataclass(slots=True)
class _Stats:
    appended_rows: int = 0
    dropped_rows: int = 0
    pending_bytes: int = 0
    disk_bytes: int = 0


def _key(workspace: str, pipeline: str) -> str:
    return f"{workspace}/{pipeline}"


class InferenceLog:
    def __init__(self, settings: LogSettings, engine: str) -> None:
        self.settings = settings
        self._engine = engine
        self._pending: deque[_Entry] = deque()
        self._lock = threading.Lock()  # guards _pending and the byte counts
        self._io = threading.Lock()  # one flush or query at a time
        self._versions: dict[str, _Version] = {}
        self._segments: list[_Segment] = []  # oldest first
        self._writers: dict[str, _Writer] = {}
        self._seq = itertools.count(int(time.time() * 1000) * 1000)
        self.stats = _Stats()
        self._scan()

    # -- request path (event loop thread) -----------------------------------------------------

    def append(
        self,
        loaded: LoadedPipeline,
        table: LogRows,
        elapsed_ns: int,
        nbytes: int,
        source: str = "",
        shadows: Shadows | None = None,
    ) -> None:
        """Records one answered request. `nbytes` estimates its size (the response's bytes);
        `source` says who sent it (kept as `metadata.source`, e.g. "loadtest"); `shadows`
        are its shadow runs, made when the rows are written or queried."""
        version = self._versions.get(loaded.spec.version_id)
        if version is None:
            version = self._version(loaded)
        with self._lock:
            self._pending.append(_Entry(version, table, elapsed_ns, nbytes, source[:64], shadows))
            stats = self.stats
            stats.pending_bytes += nbytes
            stats.appended_rows += table.num_rows
            while stats.pending_bytes > self.settings.memory_bytes and len(self._pending) > 1:
                dropped = self._pending.popleft()
                stats.pending_bytes -= dropped.nbytes
                stats.dropped_rows += dropped.table.num_rows

    def _version(self, loaded: LoadedPipeline) -> _Version:
        spec = loaded.spec
        models = [
            {"model_name": s.model_name, "model_version": s.model_version, "model_sha": s.sha256}
            for s in spec.steps
        ]
        routed = [s for s in spec.splits if s.kind != "shadow"]
        last_split = len(routed) - 1 if routed and routed[-1].step == len(spec.steps) - 1 else -1
        version = _Version(
            f"{spec.workspace}/{spec.pipeline}",
            spec.number,
            spec.version_id,
            json.dumps(models[-1]),
            json.dumps(models),
            last_split,
        )
        if len(self._versions) >= MAX_CACHED_VERSIONS:  # oldest first: remade when needed
            del self._versions[next(iter(self._versions))]
        self._versions[spec.version_id] = version
        return version

    # -- background --------------------------------------------------------------------------

    async def run_forever(self) -> None:
        """Flushes every `flush_interval` seconds; flushes once more when cancelled."""
        try:
            while True:
                await asyncio.sleep(self.settings.flush_interval)
                await asyncio.to_thread(self.flush)
                await asyncio.to_thread(self.close_idle)
        finally:
            with contextlib.suppress(Exception):
                self.flush()
            self.close()

    def flush(self) -> None:
        """Writes every pending entry to disk, then enforces the disk cap."""
        with self._io:
            with self._lock:
                entries = list(self._pending)
                self._pending.clear()
                self.stats.pending_bytes = 0
            if not entries:
                return
            by_key: dict[str, list[_Entry]] = {}
            for entry in entries:
                by_key.setdefault(entry.version.key, []).append(entry)
            for key, group in by_key.items():
                for table in self._tables(group):
                    self._write(key, table)
            self._enforce_cap()

    def close_idle(self, now: float | None = None) -> list[str]:
        """Closes the files of pipelines that logged nothing for `IDLE_WRITER_SECONDS`."""
        now = time.monotonic() if now is None else now
        with self._io:
            idle = [k for k, w in self._writers.items() if now - w.last_write > IDLE_WRITER_SECONDS]
            for key in idle:
                self._close_writer(key)
        return idle

    def _tables(self, entries: list[_Entry]) -> Iterator[pa.Table]:
        """Log tables of `entries`, one per run of entries of one version and one schema.

        The rows of a run of `Inferred` entries of one shape are built at once, from their
        arrays put together: building them one by one held the GIL for ~0.1 ms per request,
        tens of ms per flush under load, and the event loop waited for it."""
        run: list[_Entry] = []
        key: Any = None
        for entry in entries:
            rows = entry.table
            entry_key = (
                entry.version,
                rows.signature() if isinstance(rows, Inferred) else rows.schema,
                entry.shadows is None,
            )
            if run and not _same_run(key, entry_key):
                yield self._log_table(run)
                run = []
            key = entry_key
            run.append(entry)
        if run:
            yield self._log_table(run)

    def _log_table(self, run: list[_Entry]) -> pa.Table:
        """One table of entries sharing a version and a schema, metadata columns added."""
        first = run[0].table
        if isinstance(first, Inferred):
            batches = [Inferred.merged_batch([cast(Inferred, e.table) for e in run])]
        else:
            batches = [cast(pa.RecordBatch, e.table) for e in run]  # a run is of one kind
        table = pa.Table.from_batches(batches).replace_schema_metadata(None)
        table = table.combine_chunks()  # one record batch, not one per request
        rows = np.fromiter((e.table.num_rows for e in run), np.int64, len(run))
        elapsed = np.fromiter((e.elapsed_ns for e in run), np.int64, len(run))
        v = run[0].version
        n = table.num_rows
        columns = {
            "metadata.pipeline_version": _repeated(v.number, n, pa.int64()),
            "metadata.pipeline_version_id": _repeated(v.version_id, n),
            "metadata.last_model": (
                _repeated(v.last_model, n)
                if v.last_split < 0
                else _served_last(table.column(SPLIT_COLUMN), v.last_split)
            ),
            "metadata.models": _repeated(v.models, n),
            "metadata.elapsed": _per_request(elapsed, rows),
            "metadata.engine": _repeated(self._engine, n),
            "metadata.source": _sources(run, rows),
        }
        # A request's rows share its instant: one run each, not 8 bytes a row.
        table = table.set_column(0, "time", pc.run_end_encode(table.column(0).combine_chunks()))
        if run[0].shadows is not None:
            # The challengers run here, off the request path, once per request (a query of
            # pending rows and the flush after it share the result).
            for name, column in _shadow_columns(run).items():
                table = table.append_column(name, column)
        for name, column in columns.items():
            table = table.append_column(name, column)
        return table

    def _write(self, key: str, table: pa.Table) -> None:
        writer = self._writers.get(key)
        too_big = writer is not None and writer.segment.bytes >= self.settings.segment_bytes
        if writer is not None and (too_big or not writer.schema.equals(table.schema)):
            self._close_writer(key)
            writer = None
        if writer is None:
            directory = self.settings.directory / key
            directory.mkdir(parents=True, exist_ok=True)
            segment = _Segment(directory / f"{next(self._seq):020d}{_SUFFIX}", key, 0, 0)
            sink = pa.OSFile(str(segment.path), "wb")
            writer = _Writer(segment, sink, ipc.new_stream(sink, table.schema), table.schema)
            self._writers[key] = writer
            self._segments.append(segment)
        writer.writer.write_table(table)
        writer.last_write = time.monotonic()
        writer.sink.flush()
        size = writer.sink.tell()
        self.stats.disk_bytes += size - writer.segment.bytes
        writer.segment.bytes = size
        writer.segment.rows += table.num_rows

    def _close_writer(self, key: str) -> None:
        writer = self._writers.pop(key, None)
        if writer is not None:
            writer.writer.close()  # writes the end-of-stream marker
            size = writer.sink.tell()
            writer.sink.close()
            self.stats.disk_bytes += size - writer.segment.bytes
            writer.segment.bytes = size

    def _enforce_cap(self) -> None:
        stats = self.stats
        while stats.disk_bytes > self.settings.disk_bytes and self._segments:
            oldest = self._segments.pop(0)
            writer = self._writers.get(oldest.key)
            if writer is not None and writer.segment is oldest:
                self._close_writer(oldest.key)
            rows = oldest.rows if oldest.rows >= 0 else _count_rows(oldest.path)
            oldest.path.unlink(missing_ok=True)
            stats.disk_bytes -= oldest.bytes
            stats.dropped_rows += rows
            log.info("inference log over its size cap: dropped %s (%d rows)", oldest.path, rows)

    def _scan(self) -> None:
        """Indexes log files left by an earlier run (oldest first, by their sequence names)."""
        root = self.settings.directory
        if not root.is_dir():
            return
        found = sorted(root.glob(f"*/*/*{_SUFFIX}"), key=lambda p: p.name)
        for path in found:
            key = f"{path.parent.parent.name}/{path.parent.name}"
            size = path.stat().st_size
            self._segments.append(_Segment(path, key, size, -1))
            self.stats.disk_bytes += size

    def close(self) -> None:
        with self._io:
            for key in list(self._writers):
                self._close_writer(key)

    # -- queries (a worker thread) -------------------------------------------------------------

    def query(
        self,
        workspace: str,
        pipeline: str,
        limit: int,
        start_ms: int = 0,
        end_ms: int = 0,
        visible: Callable[[str], bool] = lambda workspace: True,
    ) -> pa.Table | None:
        """The newest `limit` rows of a pipeline within [start_ms, end_ms), newest first.

        An empty `workspace` matches the pipeline name in any workspace `visible` admits (the
        caller's); a named one must be visible too.
        """

        def wanted(key: str) -> bool:
            owner, name = key.split("/", 1)
            if not visible(owner):
                return False
            return key == _key(workspace, pipeline) or (not workspace and name == pipeline)

        parts: list[pa.Table] = []
        rows = 0
        with self._io:
            with self._lock:
                pending = [e for e in self._pending if wanted(e.version.key)]
            # Newest first: the pending runs (the newest last), then the files, newest first.
            files = (_read(seg.path) for seg in reversed(self._segments) if wanted(seg.key))
            for table in itertools.chain(reversed(list(self._tables(pending))), files):
                if rows >= limit:
                    break
                selected = _select(table, start_ms, end_ms, limit - rows)
                if selected.num_rows:
                    parts.append(selected)
                    rows += selected.num_rows
        if not parts:
            return None
        return concat_logs(parts).slice(0, limit)


def _same_run(a: Any, b: Any) -> bool:
    """Whether two entries' (version, shape, without shadows) keys put them in one table."""
    if a[0] is not b[0] or type(a[1]) is not type(b[1]) or a[2] != b[2]:
        return False
    return bool(a[1] == b[1]) if isinstance(a[1], tuple) else bool(a[1].equals(b[1]))


def _served_last(split: pa.ChunkedArray, index: int) -> pa.Array:
    """Each row's last model, from its `out._model_split` entry, in `metadata.last_model`'s
    JSON shape (a handful of distinct models: converted once each)."""
    entries = pc.dictionary_encode(pc.list_element(split.combine_chunks(), index))
    shaped = []
    for label in entries.dictionary.to_pylist():
        model = json.loads(label)
        shaped.append(
            json.dumps(
                {
                    "model_name": model["name"],
                    "model_version": model["version"],
                    "model_sha": model["sha"],
                }
            )
        )
    return pa.DictionaryArray.from_arrays(entries.indices, pa.array(shaped, pa.string()))


def _shadow_columns(run: list[_Entry]) -> dict[str, pa.Array]:
    """The shadow columns of a run's requests, in row order (`runtime.shadow_columns`). Values
    that cannot be put together (a challenger with dynamic output shapes) leave the columns
    out of this run's table, with a warning, rather than failing the write."""
    try:
        return shadow_columns([cast(Shadows, e.shadows) for e in run])
    except (pa.ArrowInvalid, ValueError) as exc:
        log.warning("shadow columns left out of a log write: %s", exc)
        return {}


def _sources(run: list[_Entry], rows: Any) -> pa.Array:
    """Each row's `source`: one repeated value in the usual case of a single sender."""
    first = run[0].source
    if all(e.source == first for e in run):
        return _repeated(first, int(rows.sum()))
    sources = pa.array(np.repeat(np.array([e.source for e in run], dtype=object), rows))
    return pc.dictionary_encode(sources)


def _repeated(value: Any, n: int, type: pa.DataType | None = None) -> pa.Array:
    """`value` in each of `n` rows, stored once (one run). Per-request constants stored a row
    at a time (the ids, JSON of the models, the instant, elapsed) were 45% of a 1,000-row
    request's log bytes; readers get plain columns back (`_plain`)."""
    type = type or pa.string()
    if n == 0:
        return pa.array([], type)
    return pa.RunEndEncodedArray.from_arrays(pa.array([n], pa.int32()), pa.array([value], type))


def _per_request(values: Any, rows: Any) -> pa.Array:
    """One value per request (`values`, int64) as a run of each request's `rows` rows."""
    kept = rows > 0  # run ends must increase: requests without rows add no run
    ends = np.cumsum(rows[kept], dtype=np.int64).astype(np.int32)
    if not len(ends):
        return pa.array([], pa.int64())
    return pa.RunEndEncodedArray.from_arrays(pa.array(ends), pa.array(values[kept]))


def _plain(table: pa.Table) -> pa.Table:
    """`table` with its run-end and dictionary encoded columns as plain ones: what queries
    and time selections read."""
    for i, field in enumerate(table.schema):
        if pa.types.is_run_end_encoded(field.type):
            table = table.set_column(i, field.name, pc.run_end_decode(table.column(i)))
    fields = [
        pa.field(f.name, f.type.value_type) if pa.types.is_dictionary(f.type) else f
        for f in table.schema
    ]
    return table.cast(pa.schema(fields, metadata=table.schema.metadata))


def _read(path: Path) -> pa.Table:
    try:
        with pa.OSFile(str(path), "rb") as source:
            return ipc.open_stream(source).read_all()
    except (OSError, pa.ArrowInvalid) as exc:
        log.warning("unreadable inference log file %s: %s", path, exc)
        return pa.table({"time": pa.array([], _TIME)})


def _count_rows(path: Path) -> int:
    return _read(path).num_rows if path.exists() else 0


def _select(table: pa.Table, start_ms: int, end_ms: int, most: int) -> pa.Table:
    """The newest (last appended) `most` rows in [start_ms, end_ms) (0 = unbounded), newest
    first, as plain columns. Only the rows from the oldest kept to the newest kept are
    decoded: encoded columns cannot be filtered, but a slice of them can be decoded, and a
    query for the newest 100 rows of a 16 MiB file should not decode all of it."""
    n = table.num_rows
    if start_ms or end_ms:
        times = table.column("time")
        if pa.types.is_run_end_encoded(times.type):
            times = pc.run_end_decode(times)
        mask = None
        if start_ms:
            mask = pc.greater_equal(times, pa.scalar(start_ms, _TIME))
        if end_ms:
            before = pc.less(times, pa.scalar(end_ms, _TIME))
            mask = before if mask is None else pc.and_(mask, before)
        kept = np.flatnonzero(pc.fill_null(mask, False).to_numpy())[-most:]
    else:
        kept = np.arange(max(0, n - most), n)
    if not len(kept):
        return table.slice(0, 0)
    first, last = int(kept[0]), int(kept[-1])
    return _plain(table.slice(first, last - first + 1)).take(pa.array(kept[::-1] - first))


def encode(table: pa.Table | None) -> bytes:
    """A log table as Arrow IPC stream bytes (empty for no rows)."""
    if table is None:
        return b""
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())
