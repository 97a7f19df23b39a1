"""Inference logs: the engine's domain log (ring, files, rotation) and pipeline.logs() around a
real swap on a real stack."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import hotswap
from hotswap.clients import cli
from hotswap.clients._stack import LocalStack
from hotswap.engine.inference_log import InferenceLog, LogSettings
from hotswap.engine.runtime import LoadedPipeline, PipelineSpec, RuntimeOptions, StepSpec
from tests.observability.conftest import (
    MODELS,
    poll,
    reference,
    setup_pipeline,
    tensor_table,
    xtest,
)

# --- the domain class ------------------------------------------------------------------------


def _loaded(assets: Path, key: str, number: int) -> LoadedPipeline:
    path = assets / "models" / f"{key}_model.onnx"
    spec = PipelineSpec(
        "ws", "p", f"id-{number}", number, (StepSpec(MODELS[key], f"mv-{key}", "sha-" + key, path),)
    )
    return LoadedPipeline.build(spec, RuntimeOptions())


def _append(log: InferenceLog, loaded: LoadedPipeline, x: np.ndarray) -> pa.Table:
    table = loaded.infer(tensor_table(x))
    log.append(loaded, table, 1234, table.nbytes)
    return table


def test_query_newest_first_across_memory_and_files(assets: Path, tmp_path: Path) -> None:
    x = xtest(assets)
    log = InferenceLog(LogSettings(tmp_path / "logs"), "engine-a")
    v1, v2 = _loaded(assets, "rf", 1), _loaded(assets, "gbr", 2)
    for i in range(3):
        _append(log, v1, x[i : i + 2])
    log.flush()  # these three are on disk now
    assert list((tmp_path / "logs" / "ws" / "p").glob("*.arrow"))
    for i in range(3, 5):
        _append(log, v2, x[i : i + 1])  # these two only in memory

    table = log.query("ws", "p", limit=100)
    assert table is not None and table.num_rows == 8
    versions = table.column("metadata.pipeline_version").to_pylist()
    assert versions == [2, 2, 1, 1, 1, 1, 1, 1]  # newest first
    models = [json.loads(m)["model_name"] for m in table.column("metadata.last_model").to_pylist()]
    assert models[:2] == [MODELS["gbr"]] * 2 and set(models[2:]) == {MODELS["rf"]}
    assert table.column("metadata.engine").to_pylist() == ["engine-a"] * 8
    assert table.column("metadata.elapsed").to_pylist() == [1234] * 8
    # Rows are whole requests reversed: the newest request's input comes first.
    got = np.asarray(table.column("in.tensor").combine_chunks().flatten()).reshape(-1, 18)
    np.testing.assert_array_equal(got[0], x[4])
    np.testing.assert_array_equal(got[2], x[3])  # last row of the 2-row request at x[2:4]
    assert log.query("ws", "p", limit=3).num_rows == 3  # type: ignore[union-attr]
    assert log.query("ws", "other", limit=3) is None
    assert log.query("", "p", limit=1).num_rows == 1  # type: ignore[union-attr]


def test_request_constants_are_stored_once_and_read_back_plain(
    assets: Path, tmp_path: Path
) -> None:
    """What every row of a request shares (the models' JSON, ids, the engine, its instant and
    elapsed time) is written once per batch or once per request, not once per row; queries
    still answer plain columns."""
    x = xtest(assets)
    log = InferenceLog(LogSettings(tmp_path / "logs"), "engine-a")
    v1 = _loaded(assets, "rf", 1)
    for _ in range(2):
        _append(log, v1, x[:500])
    log.flush()
    [path] = (tmp_path / "logs" / "ws" / "p").glob("*.arrow")
    with pa.OSFile(str(path), "rb") as source:
        stored = pa.ipc.open_stream(source).read_all()
    shared = ("metadata.models", "metadata.last_model", "metadata.pipeline_version_id")
    for name in (*shared, "metadata.pipeline_version", "metadata.engine"):
        column = stored.column(name)
        assert pa.types.is_run_end_encoded(column.type), name
        assert [len(chunk.values) for chunk in column.chunks] == [1], name
    for name in ("time", "metadata.elapsed"):  # one run per request at most
        column = stored.column(name)
        assert pa.types.is_run_end_encoded(column.type), name
        assert sum(len(chunk.values) for chunk in column.chunks) <= 2, name
    # ~80 bytes a row: the inputs (72), the output and check_failures. Written per row, the
    # shared strings alone took ~160 more, and the instants, versions and elapsed times 24.
    assert path.stat().st_size < 1000 * 90
    table = log.query("ws", "p", limit=1000)
    assert table is not None and table.num_rows == 1000
    encoded = [f.name for f in table.schema if pa.types.is_dictionary(f.type)]
    encoded += [f.name for f in table.schema if pa.types.is_run_end_encoded(f.type)]
    assert encoded == []
    assert table.column("metadata.elapsed").to_pylist() == [1234] * 1000
    assert table.column("metadata.pipeline_version").to_pylist() == [1] * 1000
    assert len(set(table.column("time").to_pylist()[:500])) == 1
    last = json.loads(table.column("metadata.last_model")[0].as_py())
    assert last["model_name"] == MODELS["rf"]
    assert table.column("metadata.pipeline_version_id").to_pylist() == ["id-1"] * 1000
    assert table.column("metadata.engine").to_pylist() == ["engine-a"] * 1000


def test_time_window(assets: Path, tmp_path: Path) -> None:
    log = InferenceLog(LogSettings(tmp_path), "e")
    v1 = _loaded(assets, "rf", 1)
    x = xtest(assets)
    first = _append(log, v1, x[:1])
    t0 = first.column("time")[0].value
    # The next request must land in a later millisecond for the window to split them.
    poll(lambda: time.time_ns() // 1_000_000 > t0, 1.0, 0.001)
    second = _append(log, v1, x[1:2])
    t1 = second.column("time")[0].value
    log.flush()
    only_first = log.query("ws", "p", 10, start_ms=t0, end_ms=t1)
    assert only_first is not None and only_first.num_rows == 1
    only_second = log.query("ws", "p", 10, start_ms=t1, end_ms=t1 + 1)
    assert only_second is not None and only_second.num_rows == 1
    assert log.query("ws", "p", 10, start_ms=t1 + 1, end_ms=t1 + 1000) is None


def test_disk_cap_drops_oldest_files_and_counts(assets: Path, tmp_path: Path) -> None:
    v1 = _loaded(assets, "rf", 1)
    x = xtest(assets)
    settings = LogSettings(tmp_path, disk_bytes=20_000, segment_bytes=4_000)
    log = InferenceLog(settings, "e")
    for i in range(40):
        _append(log, v1, x[i * 10 : i * 10 + 10])
        log.flush()
    assert log.stats.appended_rows == 400
    assert log.stats.disk_bytes <= settings.disk_bytes
    on_disk = sum(p.stat().st_size for p in tmp_path.rglob("*.arrow"))
    assert on_disk == log.stats.disk_bytes
    kept = log.query("ws", "p", 1000)
    assert kept is not None
    assert log.stats.dropped_rows > 0
    assert kept.num_rows + log.stats.dropped_rows == 400
    # What is kept is the newest: the first row returned is the last row appended.
    newest = np.asarray(kept.column("in.tensor")[0].values)
    np.testing.assert_array_equal(newest, x[399])
    # A restarted engine finds the files again.
    again = InferenceLog(settings, "e")
    assert again.query("ws", "p", 1000).num_rows == kept.num_rows  # type: ignore[union-attr]
    log.close()


def test_memory_ring_drops_oldest(assets: Path, tmp_path: Path) -> None:
    v1 = _loaded(assets, "rf", 1)
    x = xtest(assets)
    log = InferenceLog(LogSettings(tmp_path, memory_bytes=5_000), "e")
    for i in range(20):
        _append(log, v1, x[i * 10 : i * 10 + 10])
    assert log.stats.pending_bytes <= 5_000
    kept = log.query("ws", "p", 1000)
    assert kept is not None and log.stats.dropped_rows > 0
    assert kept.num_rows + log.stats.dropped_rows == 200


def test_disabled_engine_keeps_no_log(assets: Path, tmp_path: Path) -> None:
    with (
        LocalStack(tmp_path / "s", engine_args=("--no-inference-log",)) as stack,
        hotswap.Client(stack.control_address) as wl,
    ):
        pipeline, _ = setup_pipeline(wl, assets)
        pipeline.infer(tensor_table(xtest(assets)[:2]))
        assert pipeline.logs(arrow=True).num_rows == 0
        assert not (tmp_path / "s" / "engines" / "engine-1" / "inference-logs").exists()


# --- pipeline.logs() on a real stack ----------------------------------------------------------


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LocalStack]:
    with LocalStack(tmp_path / "stack", engines=2) as running:
        yield running


def test_logs_around_a_swap(
    stack: LocalStack, assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = xtest(assets)
    with hotswap.Client(stack.control_address) as wl:
        pipeline, models = setup_pipeline(wl, assets)
        pipeline.deploy(
            deployment_config=hotswap.DeploymentConfigBuilder().replica_count(2).build()
        )
        before = datetime.now(UTC) - timedelta(seconds=1)
        for i in range(6):
            pipeline.infer(tensor_table(x[i : i + 1]))
        pipeline.replace_with_model_step(0, models["gbr"]).deploy()
        for i in range(6, 10):
            pipeline.infer(tensor_table(x[i : i + 1]))

        table = poll(lambda: (t := pipeline.logs(arrow=True, dataset=["*"])).num_rows == 10 and t)
        assert set(table.column("metadata.engine").to_pylist()) == {"engine-1", "engine-2"}
        times = table.column("time").to_pylist()
        assert times == sorted(times, reverse=True)  # newest first, merged across engines
        versions = table.column("metadata.pipeline_version").to_pylist()
        assert versions == [2] * 4 + [1] * 6
        inputs = np.asarray(table.column("in.tensor").combine_chunks().flatten()).reshape(-1, 18)
        outputs = np.asarray(table.column("out.variable").combine_chunks().flatten())
        for row, version in enumerate(versions):
            last = json.loads(table.column("metadata.last_model")[row].as_py())
            key = "rf" if version == 1 else "gbr"
            assert last["model_name"] == MODELS[key]
            assert last["model_sha"] == models[key].sha()
            expected = reference(assets, key, inputs[row : row + 1])[0, 0]
            assert outputs[row] == pytest.approx(expected, rel=1e-6)

        # pandas by default, with the tutorial's default columns; metadata on request.
        df = pipeline.logs(limit=3)
        assert list(df.columns) == ["time", "in.tensor", "out.variable", "check_failures"]
        assert len(df) == 3
        meta = pipeline.logs(limit=2, dataset=["metadata"])
        assert {"metadata.last_model", "metadata.pipeline_version", "metadata.elapsed"} <= set(
            meta.columns
        )
        assert list(meta["metadata.pipeline_version"]) == [2, 2]

        # start/end select a window; they go together.
        assert len(pipeline.logs(start=before, end=datetime.now(UTC) + timedelta(1))) == 10
        future = datetime.now(UTC) + timedelta(hours=1)
        assert len(pipeline.logs(start=future, end=future + timedelta(hours=1))) == 0
        with pytest.raises(ValueError, match="both start and end"):
            pipeline.logs(start=before)

        files = pipeline.export_logs(tmp_path / "export")
        assert sorted(p.name.split("-")[1] for p in files) == ["v1", "v2"]
        exported = [pa.ipc.open_file(p).read_all() for p in files]
        assert sum(t.num_rows for t in exported) == 10

    code = cli.main(
        [
            "logs",
            "housing",
            "--limit",
            "5",
            "--address",
            stack.control_address,
            "--workspace",
            wl.get_current_workspace().name(),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert MODELS["gbr"] in out and out.count("\n") >= 7


def test_idle_pipelines_release_their_log_files(assets: Path, tmp_path: Path) -> None:
    from hotswap.engine.inference_log import IDLE_WRITER_SECONDS

    log = InferenceLog(LogSettings(tmp_path / "logs"), "e")
    x = xtest(assets)
    _append(log, _loaded(assets, "rf", 1), x[:2])
    log.flush()
    assert log.close_idle() == []  # it just wrote
    later = time.monotonic() + IDLE_WRITER_SECONDS + 1
    assert log.close_idle(now=later) == ["ws/p"]
    # The rows are still there to query, from the closed file.
    assert log.query("ws", "p", 10).num_rows == 2  # type: ignore[union-attr]
    log.close()


def test_a_caller_sees_only_its_workspaces_logs(assets: Path, tmp_path: Path) -> None:
    log = InferenceLog(LogSettings(tmp_path / "logs"), "e")
    _append(log, _loaded(assets, "rf", 1), xtest(assets)[:2])
    assert log.query("", "p", 10, visible=lambda ws: ws == "ws").num_rows == 2  # type: ignore[union-attr]
    assert log.query("", "p", 10, visible=lambda ws: ws == "other") is None
    assert log.query("ws", "p", 10, visible=lambda ws: ws == "other") is None
    log.close()


def test_a_limited_query_of_a_file_answers_its_newest_rows_in_a_window(
    assets: Path, tmp_path: Path
) -> None:
    """A file's encoded columns cannot be filtered, only sliced and decoded: the newest
    rows of the window must still come back, newest first, and only as many as asked."""
    x = xtest(assets)
    log = InferenceLog(LogSettings(tmp_path), "e")
    v1 = _loaded(assets, "rf", 1)
    first = _append(log, v1, x[:300])
    t0 = first.column("time")[0].value
    poll(lambda: time.time_ns() // 1_000_000 > t0, 1.0, 0.001)
    t1 = _append(log, v1, x[300:600]).column("time")[0].value
    log.flush()

    def inputs(table: pa.Table | None) -> np.ndarray:
        assert table is not None
        return np.asarray(table.column("in.tensor").combine_chunks().flatten()).reshape(-1, 18)

    np.testing.assert_array_equal(inputs(log.query("ws", "p", 3)), x[599:596:-1])
    in_first = log.query("ws", "p", 3, start_ms=t0, end_ms=t1)
    np.testing.assert_array_equal(inputs(in_first), x[299:296:-1])  # the first request's last
    assert in_first.column("time").to_pylist() == [first.column("time")[0].as_py()] * 3  # type: ignore[union-attr]
    assert log.query("ws", "p", 1000, start_ms=t0, end_ms=t1).num_rows == 300  # type: ignore[union-attr]
