"""Models served by a process of their own (engine/model_process.py), with real ONNX Runtime
in real child processes: answers, refusals, the child's death and its end when retired."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pytest
from onnx import TensorProto, helper
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from hotswap.engine import model_process
from hotswap.engine.errors import InvalidInput, ModelUnavailable, PrepareError
from hotswap.engine.model_process import ProcessSession
from hotswap.engine.runtime import LoadedPipeline, RuntimeOptions
from hotswap.engine.settings import Settings
from tests.engine.test_runtime import affine, out_values, spec, write_model

EVERY_MODEL = RuntimeOptions(isolate_bytes=0)


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    """In-process ONNX Runtime with the engine's threading (one thread: the same sum order)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    result: np.ndarray = session.run(None, {session.get_inputs()[0].name: x})[0]
    return result


def _state(pid: int) -> str:
    """The process's state letter in /proc (R, S, T, Z...), "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:  # gone, also while being read (ProcessLookupError)
        return ""


def _alive(pid: int) -> bool:
    return _state(pid) not in ("", "Z")


def _until(condition: Callable[[], bool], what: str, deadline_s: float = 20.0) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"not within {deadline_s} s: {what}")
        time.sleep(0.02)


def _children(zombies: bool = False) -> set[int]:
    """This process's children: running ones, or with `zombies` also the unreaped."""
    me = os.getpid()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
        except (FileNotFoundError, NotADirectoryError, ProcessLookupError):
            continue
        if fields[1] == str(me) and (zombies or fields[0] != "Z"):
            found.add(int(entry.name))
    return found


def test_answers_equal_in_process_onnx_runtime(assets: Path, tmp_path: Path) -> None:
    path = assets / "models" / "rf_model.onnx"
    session = ProcessSession(path, "model 'rf' version 1")
    assert session.pid in _children()
    assert [(a.name, a.type, a.shape) for a in session.get_inputs()] == [
        ("float_input", "tensor(float)", [None, 18])
    ]
    rng = np.random.default_rng(3)
    for rows in (1, 7, 1000):
        x = rng.random((rows, 18), np.float32) * 10
        got = session.run(None, {"float_input": x})
        assert np.array_equal(got[0], ort_run(path, x))
    # A non-contiguous view is sent as its values, not as its buffer.
    x = (rng.random((20, 36), np.float32) * 10)[:, ::2]
    assert np.array_equal(session.run(None, {"float_input": x})[0], ort_run(path, x))
    # ONNX Runtime's refusal crosses the socket as its own type (the runtime maps it to
    # InvalidInput naming the step), and the connection stays usable.
    with pytest.raises(ort_state.InvalidArgument, match="Got: 3 Expected: 18"):
        session.run(None, {"float_input": np.ones((1, 3), np.float32)})
    assert np.array_equal(session.run(None, {"float_input": x})[0], ort_run(path, x))


def test_a_pipeline_of_isolated_steps_serves_as_in_process(assets: Path, tmp_path: Path) -> None:
    path = assets / "models" / "gbr_model.onnx"
    scale = affine(tmp_path / "scale.onnx", ("N", 1))
    pipeline = LoadedPipeline.build(spec(("gbr", path), ("scale", scale)), EVERY_MODEL)
    assert pipeline.isolated
    in_process = LoadedPipeline.build(spec(("gbr", path), ("scale", scale)), RuntimeOptions())
    assert not in_process.isolated
    x = np.random.default_rng(5).random((50, 18), np.float32) * 10
    batch = pa.RecordBatch.from_pydict({"tensor": pa.array(list(x), pa.list_(pa.float32(), 18))})
    assert np.array_equal(
        out_values(pipeline.infer(batch), "out.y"), out_values(in_process.infer(batch), "out.y")
    )


def test_a_model_it_cannot_load_is_a_prepare_error_naming_the_step(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07not a model at all" * 100)
    before = _children(zombies=True)
    with pytest.raises(PrepareError, match=r"step 0 \(model 'bad' .*in a process of its own"):
        LoadedPipeline.build(spec(("bad", bad)), EVERY_MODEL)
    assert _children(zombies=True) <= before  # the child that failed is reaped, not a zombie


def test_freeing_the_last_version_ends_its_process(assets: Path) -> None:
    path = assets / "models" / "xgb_model.onnx"
    first = LoadedPipeline.build(spec(("xgb", path)), EVERY_MODEL)
    pid = first.sessions_by_sha()["sha0"].pid
    # A second version reusing the session keeps the one process alive.
    second = LoadedPipeline.build(
        spec(("xgb", path), number=8), EVERY_MODEL, first.sessions_by_sha()
    )
    assert second.sessions_by_sha()["sha0"].pid == pid
    del first
    gc.collect()
    assert _alive(pid)
    del second
    gc.collect()
    _until(lambda: not _alive(pid), "the model process ended once no version held it")


def test_a_killed_model_process_is_unavailable_then_restarted(assets: Path) -> None:
    path = assets / "models" / "rf_model.onnx"
    session = ProcessSession(path, "model 'rf' version 1")
    x = np.ones((1, 18), np.float32)
    expected = ort_run(path, x)
    first = session.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    _until(lambda: not _alive(first), "the killed child is reaped or gone")
    with pytest.raises(ModelUnavailable, match=r"serving model 'rf' version 1 ended .*SIGKILL"):
        session.run(None, {"float_input": x})
    served: list[np.ndarray] = []

    def serves_again() -> bool:
        try:
            served.append(session.run(None, {"float_input": x})[0])
        except ModelUnavailable:
            return False
        return True

    _until(serves_again, "a new process serves the model")
    assert session.pid not in (None, first)
    assert np.array_equal(served[-1], expected)


def test_string_tensors_and_shapes_cross_the_wire() -> None:
    a, b = socket.socketpair()
    with a, b:
        values: list[np.ndarray] = [
            np.array([["a", "ü"], ["", "long" * 100]], dtype=object),
            np.zeros((0, 3), np.int64),
            np.array([True, False]),
            np.array([1.5], np.float16),
        ]
        model_process._send(a, {"k": 1}, values)
        header, got = model_process._receive(b)
    assert header == {"k": 1}
    for sent, received in zip(values, got, strict=True):
        assert received.shape == sent.shape and received.dtype == sent.dtype
        assert received.tolist() == sent.tolist()


def _raw(header: bytes, payload: bytes = b"", payload_size: int | None = None) -> bytes:
    size = len(payload) if payload_size is None else payload_size
    return struct.pack("<IQ", len(header), size) + header + payload


@pytest.mark.parametrize(
    ("message", "refusal"),
    [
        (_raw(b'{"tensors": [{"dtype": "|O", "shape": [1]}]}', b"x" * 8), "dtype"),
        (_raw(b'{"tensors": [{"dtype": "<f4", "shape": [4]}]}', b"x" * 8), "larger"),
        (_raw(b'{"tensors": [{"dtype": "<f4", "shape": [1]}]}', b"x" * 8), "no tensor holds"),
        (_raw(b'{"tensors": [{"dtype": "<f4", "shape": [-1]}]}'), "shaped"),
        (_raw(b"{}", payload_size=1 << 40), "over the bound"),
    ],
    ids=["object-dtype", "short-payload", "extra-bytes", "negative-dim", "huge-size"],
)
def test_a_malformed_answer_is_refused_not_trusted(message: bytes, refusal: str) -> None:
    """What a child taken over by a hostile model could send: refused before any array is
    made of it (and nothing is ever unpickled)."""
    a, b = socket.socketpair()
    with a, b:
        a.sendall(message)
        with pytest.raises(ValueError, match=refusal):
            model_process._receive(b)


def test_big_models_only_are_isolated_by_default(assets: Path, tmp_path: Path) -> None:
    small = assets / "models" / "rf_model.onnx"
    assert not LoadedPipeline.build(spec(("rf", small)), RuntimeOptions()).isolated
    # A model padded past the threshold with an unused initializer is isolated.
    big = write_model(
        tmp_path / "big.onnx",
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        {"pad": np.zeros(1_100_000, np.float32)},
    )
    threshold = 4 * 1024**2
    options = RuntimeOptions(isolate_bytes=threshold)
    assert big.stat().st_size >= threshold
    assert LoadedPipeline.build(spec(("big", big)), options).isolated
    assert not LoadedPipeline.build(spec(("big", big)), RuntimeOptions(isolate_bytes=None)).isolated


def test_the_engine_flag_takes_sizes_and_off_and_refuses_the_rest() -> None:
    assert Settings().isolate_above_mb == 8.0
    assert Settings.from_args(["--isolate-above-mb", "off"], {}).isolate_above_mb is None
    assert Settings.from_args(["--isolate-above-mb", "off"], {}).isolate_bytes is None
    assert Settings.from_args(["--isolate-above-mb", "2.5"], {}).isolate_bytes == 2_621_440
    assert Settings.from_args(["--isolate-above-mb", "0"], {}).isolate_above_mb == 0.0
    assert Settings.from_args([], {"HOTSWAP_ISOLATE_ABOVE_MB": "64"}).isolate_above_mb == 64.0
    for bad in ("big", "-1", "nan", "inf"):
        with pytest.raises(SystemExit):
            Settings.from_args(["--isolate-above-mb", bad], {})


def test_a_hung_model_process_is_timed_out_killed_and_replaced(
    assets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child that stops answering (here: SIGSTOPped) holds an inference thread for at most
    the call timeout; then it is killed and a new one serves."""
    monkeypatch.setattr(model_process, "CALL_TIMEOUT_S", 1.0)
    path = assets / "models" / "rf_model.onnx"
    session = ProcessSession(path, "model 'rf' version 1")
    x = np.ones((1, 18), np.float32)
    session.run(None, {"float_input": x})
    hung = session.pid
    assert hung is not None
    os.kill(hung, signal.SIGSTOP)
    _until(lambda: _state(hung) == "T", "the child is stopped")  # a signal lands in its time
    started = time.monotonic()
    with pytest.raises(ModelUnavailable, match=r"did not answer within 1 s; it is restarting"):
        session.run(None, {"float_input": x})
    assert 0.9 < time.monotonic() - started < 10
    _until(lambda: not _alive(hung), "the hung child was killed")

    def serves() -> bool:
        try:
            return bool(np.array_equal(session.run(None, {"float_input": x})[0], ort_run(path, x)))
        except ModelUnavailable:
            return False

    _until(serves, "a new process serves the model")
    assert session.pid != hung


def test_a_model_that_does_not_load_in_time_is_a_prepare_error(
    assets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_process, "LOAD_TIMEOUT_S", 0.01)
    before = _children(zombies=True)
    with pytest.raises(PrepareError, match=r"did not load it within 0.01 s"):
        LoadedPipeline.build(spec(("rf", assets / "models" / "rf_model.onnx")), EVERY_MODEL)
    assert _children(zombies=True) <= before


X1 = np.ones((1, 18), np.float32)


def test_a_request_over_the_wire_bounds_is_refused_without_touching_the_process(
    assets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Too big to send is the caller's problem (INVALID_ARGUMENT), not a dead child: the
    process is not restarted and serves the next call."""
    session = ProcessSession(assets / "models" / "rf_model.onnx", "model 'rf' version 1")
    pid = session.pid
    monkeypatch.setattr(model_process, "_MAX_PAYLOAD", 1000)
    with pytest.raises(InvalidInput, match=r"model 'rf' version 1 cannot take this request"):
        session.run(None, {"float_input": np.ones((100, 18), np.float32)})
    assert session.pid == pid and session.healthy
    assert session.run(None, {"float_input": X1})[0].shape == (1, 1)


def _scripted(answer: Callable[[socket.socket], None]) -> Callable[[object], socket.socket]:
    """A `_Child.connection` whose peer is `answer`, run in a thread, instead of the child."""

    def connection(child: object) -> socket.socket:
        mine, theirs = socket.socketpair()
        mine.settimeout(model_process.CALL_TIMEOUT_S)

        def serve() -> None:
            with theirs, contextlib.suppress(OSError):  # the engine hangs up when it gives up
                model_process._receive(theirs)
                answer(theirs)
                end = time.monotonic() + 5  # held open until the engine gives up on it
                while not model_process._closed(theirs) and time.monotonic() < end:
                    time.sleep(0.05)

        threading.Thread(target=serve, daemon=True).start()
        return mine

    return connection


def _trickle(sock: socket.socket) -> None:
    for byte in _raw(b"{}" + b" " * 30):
        sock.sendall(bytes([byte]))
        time.sleep(0.1)  # the point of the case: a slow peer


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (lambda s: s.sendall(_raw(b"[]")), "malformed answer"),
        (lambda s: s.sendall(_raw(b"{}")), "malformed answer"),
        (lambda s: s.sendall(_raw(b'{"tensors": [{"dtype": "<f4", "shape": 5}]}')), "malformed"),
        (lambda s: s.sendall(_raw(b'{"tensors": [{"dtype": "str", "shape": [2]}]}')), "malformed"),
        (lambda s: s.sendall(_raw(b"[" * 100_000)), "malformed answer"),
        # Announces 512 MiB and sends none of it: nothing is allocated up front, and the
        # call ends at its deadline.
        (lambda s: s.sendall(struct.pack("<IQ", 2, 512 * 1024**2) + b"{}"), "did not answer"),
        # One byte at a time: the deadline is the whole answer's, not each read's.
        (_trickle,
         "did not answer"),
    ],
    ids=["list", "no-tensors", "int-shape", "no-values", "deep", "announced-512MiB", "trickle"],
)  # fmt: skip
def test_a_bad_answer_from_the_process_is_unavailable_and_replaces_it(
    assets: Path,
    monkeypatch: pytest.MonkeyPatch,
    answer: Callable[[socket.socket], None],
    why: str,
) -> None:
    """What a child taken over by a hostile model could answer: every case is
    ModelUnavailable (never a crash, a hang or memory taken), and the child is replaced."""
    session = ProcessSession(assets / "models" / "rf_model.onnx", "model 'rf' version 1")
    first = session.pid
    monkeypatch.setattr(model_process, "CALL_TIMEOUT_S", 1.0)
    monkeypatch.setattr(model_process._Child, "connection", _scripted(answer))
    before = _rss_mb()
    started = time.monotonic()
    with pytest.raises(ModelUnavailable, match=why):
        session.run(None, {"float_input": X1})
    assert time.monotonic() - started < 5
    assert _rss_mb() - before < 100
    monkeypatch.undo()
    _until(lambda: session.healthy and session.pid != first, "a new process replaced it")
    assert session.run(None, {"float_input": X1})[0].shape == (1, 1)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_the_process_gets_no_engine_credential_and_not_the_working_directory(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOTSWAP_ENGINE_TOKEN", "engine-secret-0123456789")
    marker = tmp_path / "planted-ran"
    (tmp_path / "argparse.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(tmp_path)
    session = ProcessSession(assets / "models" / "rf_model.onnx", "model 'rf' version 1")
    environment = Path(f"/proc/{session.pid}/environ").read_bytes()
    assert b"engine-secret" not in environment and b"HOTSWAP_" not in environment
    assert not marker.exists()  # the planted module in the engine's directory never ran
    assert session.run(None, {"float_input": X1})[0].shape == (1, 1)


def test_the_process_outlives_a_group_sigterm_and_serves_through_it(assets: Path) -> None:
    """A service manager's SIGTERM to the whole group reaches the child: the engine may be
    draining, so the child keeps serving until the engine closes its socket."""
    session = ProcessSession(assets / "models" / "rf_model.onnx", "model 'rf' version 1")
    assert session.pid is not None
    session.run(None, {"float_input": X1})
    os.kill(session.pid, signal.SIGTERM)
    for _ in range(20):
        assert session.run(None, {"float_input": X1})[0].shape == (1, 1)
    assert _alive(session.pid)


def test_a_model_that_can_no_longer_load_gives_up_and_is_not_reused(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_process, "RESTART_ATTEMPTS", 2)
    path = tmp_path / "rf.onnx"
    path.write_bytes((assets / "models" / "rf_model.onnx").read_bytes())
    pipeline = LoadedPipeline.build(spec(("rf", path)), EVERY_MODEL)
    session = pipeline.sessions_by_sha()["sha0"]
    path.write_bytes(b"no longer a model")
    assert session.pid is not None
    os.kill(session.pid, signal.SIGKILL)
    with pytest.raises(ModelUnavailable):
        session.run(None, {"float_input": X1})
    _until(lambda: bool(session.failed) and not session._restarting.locked(), "gave up")
    assert not session.healthy and not pipeline.healthy
    with pytest.raises(ModelUnavailable, match="cannot be restarted"):
        session.run(None, {"float_input": X1})
