"""Big models served from a process of their own, which simply exits when they are retired.

ONNX Runtime frees a session, and builds parts of it, while holding the GIL: for a 100 MB tree
ensemble that stalls every request of every pipeline on the engine for tens to hundreds of ms
(docs/adr/0003, 0010). A model whose file is at least `RuntimeOptions.isolate_bytes` is
therefore loaded by a child process (`python -m hotswap.engine.model_process`), and the engine
calls it over unix sockets. `ProcessSession` answers the three calls the runtime makes of an
ONNX Runtime session (`run`, `get_inputs`, `get_outputs`), so the rest of the engine does not
know the difference. When the last version holding it is freed, the child is killed: the kernel
takes its memory back, and no thread of the engine waits or holds the GIL meanwhile.

The wire, both ways: a 12-byte prefix (header length u32, payload length u64, little endian),
a JSON header naming each tensor's dtype and shape, then the tensors' bytes back to back.
Strings (ONNX `tensor(string)`) travel in the header. Nothing is unpickled: a child that a
hostile model took over can send wrong numbers, not code. The sockets are socket pairs: the
first is given to the child at its start, and each further one (one per concurrent caller) is
passed over the first with SCM_RIGHTS, so no path on disk ever names them.

The child imports numpy, onnxruntime and the standard library only, to start quickly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hotswap.engine.errors import InvalidInput, ModelUnavailable

log = logging.getLogger(__name__)

_PREFIX = struct.Struct("<IQ")
_MAX_HEADER = 16 * 1024**2  # a header holds names and shapes (and strings, rarely)
_MAX_PAYLOAD = 4 * 1024**3  # tensors of one call, either way
# The numeric types ONNX Runtime takes and gives as numpy arrays, by numpy's dtype.str.
_DTYPES = frozenset(
    np.dtype(t).str
    for t in (
        np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
        np.uint8, np.uint16, np.uint32, np.uint64, np.bool_,
    )
)  # fmt: skip
_STRING = "str"
_CHUNK = 1 << 20
# A child that dies this soon after it was started is restarted only after a growing pause.
_STEADY_S = 10.0
_MAX_BACKOFF_S = 30.0
# A child that takes longer to load its model, or to answer one call, is taken for hung:
# killed (and, once it served, restarted). Both bound what a stuck child can hold: the
# engine's one build thread, or one of its inference threads.
LOAD_TIMEOUT_S = 600.0
CALL_TIMEOUT_S = 60.0
_BUILD_NICENESS = 10


class _Closed(Exception):
    """The peer closed its end of the socket."""


@dataclass(frozen=True, slots=True)
class ArgInfo:
    """An input or output as `InferenceSession.get_inputs()` describes it."""

    name: str
    type: str  # e.g. "tensor(float)"
    shape: list[int | str | None]


# -- the wire ---------------------------------------------------------------------------------


class MessageTooLarge(Exception):
    """What was to be sent is over the wire's bounds (nothing was sent)."""


def _send(sock: socket.socket, header: dict[str, Any], arrays: Sequence[Any] = ()) -> None:
    """Raises:
    MessageTooLarge: over the bounds the receiver enforces; checked before anything is sent.
    """
    specs: list[dict[str, Any]] = []
    buffers: list[memoryview] = []
    for value in arrays:
        array = np.asarray(value)
        if array.dtype.kind in "OUS":  # ONNX strings
            specs.append(
                {"dtype": _STRING, "shape": list(array.shape), "values": array.ravel().tolist()}
            )
            continue
        array = np.ascontiguousarray(array)
        specs.append({"dtype": array.dtype.str, "shape": list(array.shape)})
        buffers.append(array.reshape(-1).view(np.uint8).data)
    encoded = json.dumps({**header, "tensors": specs}, ensure_ascii=False).encode()
    payload = sum(b.nbytes for b in buffers)
    if len(encoded) > _MAX_HEADER or payload > _MAX_PAYLOAD:
        raise MessageTooLarge(
            f"{len(encoded):,} bytes of names and strings and {payload:,} bytes of tensors, over "
            f"the {_MAX_HEADER:,} and {_MAX_PAYLOAD:,} a model process exchanges in one call"
        )
    parts = [memoryview(_PREFIX.pack(len(encoded), payload)), memoryview(encoded), *buffers]
    sent = sock.sendmsg(parts)
    for part in parts:  # what a partial sendmsg left, in order
        size = part.nbytes
        if sent >= size:
            sent -= size
            continue
        sock.sendall(part[sent:])
        sent = 0


def _receive_exactly(
    sock: socket.socket, size: int, deadline: float | None, grow: bool
) -> bytearray:
    """`size` bytes, by `deadline` (monotonic; None: no limit). With `grow`, memory is taken as
    the bytes arrive, not when the peer announces them: a peer must send what it makes us hold."""
    data = bytearray() if grow else bytearray(size)
    view = None if grow else memoryview(data)  # a bytearray with a view cannot grow
    received = 0
    while received < size:
        if deadline is not None:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
        if grow:
            chunk = sock.recv(min(_CHUNK, size - received))
            got = len(chunk)
            data += chunk
        else:
            assert view is not None
            got = sock.recv_into(view[received:])
        if not got:
            raise _Closed
        received += got
        if deadline is not None and time.monotonic() > deadline and received < size:
            raise TimeoutError
    return data


def _receive(
    sock: socket.socket, deadline: float | None = None, *, grow: bool = False
) -> tuple[dict[str, Any], list[Any]]:
    """One message: its header and its tensors (numpy arrays over the received bytes).

    Raises:
        _Closed: the peer closed the socket.
        TimeoutError: the whole message had not arrived by `deadline`.
        ValueError: the message is malformed (sizes, dtypes or shapes that do not add up).
    """
    header_size, payload_size = _PREFIX.unpack(
        _receive_exactly(sock, _PREFIX.size, deadline, False)
    )
    if header_size > _MAX_HEADER or payload_size > _MAX_PAYLOAD:
        raise ValueError(f"a message of {header_size} + {payload_size} bytes is over the bound")
    raw = _receive_exactly(sock, header_size, deadline, grow)
    payload = _receive_exactly(sock, payload_size, deadline, grow) if payload_size else bytearray()
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("a header that is not an object")
        arrays = _tensors(header.pop("tensors"), payload)
    except (KeyError, TypeError, IndexError, AttributeError, RecursionError) as exc:
        raise ValueError(f"a malformed header ({type(exc).__name__}: {exc})") from exc
    return header, arrays


def _tensors(specs: list[dict[str, Any]], payload: bytearray) -> list[Any]:
    arrays: list[Any] = []
    offset = 0
    for spec in specs:
        shape = tuple(int(d) for d in spec["shape"])
        if any(d < 0 for d in shape):
            raise ValueError(f"a tensor shaped {shape}")
        if spec["dtype"] == _STRING:
            values = spec["values"]
            if not isinstance(values, list) or len(values) != math.prod(shape):
                raise ValueError(f"string values that do not fill shape {shape}")
            arrays.append(np.array([str(v) for v in values], dtype=object).reshape(shape))
            continue
        if spec["dtype"] not in _DTYPES:
            raise ValueError(f"a tensor of dtype {spec['dtype']!r}")
        dtype = np.dtype(spec["dtype"])
        size = math.prod(shape) * dtype.itemsize
        if offset + size > len(payload):
            raise ValueError("tensors larger than the message")
        arrays.append(np.frombuffer(payload, dtype, math.prod(shape), offset).reshape(shape))
        offset += size
    if offset != len(payload):
        raise ValueError("a message with bytes no tensor holds")
    return arrays


# -- the engine's side ------------------------------------------------------------------------


def _child_environment() -> dict[str, str]:
    """The engine's environment without hotswap's own settings: the engine's credential
    (HOTSWAP_ENGINE_TOKEN) and the rest stay with the engine."""
    return {k: v for k, v in os.environ.items() if not k.startswith("HOTSWAP_")}


class _Child:
    """One started model process and the sockets to it."""

    def __init__(self, path: Path, intra_op_threads: int, inter_op_threads: int) -> None:
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # -P: the engine's working directory is not on the child's import path.
            self.process = subprocess.Popen(
                [sys.executable, "-P", "-m", __name__, "--control-fd", str(theirs.fileno()),
                 "--intra-op-threads", str(intra_op_threads),
                 "--inter-op-threads", str(inter_op_threads), str(path.resolve())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                cwd="/",
                env=_child_environment(),
            )  # fmt: skip
        finally:
            theirs.close()
        self.started = time.monotonic()
        self.idle: list[socket.socket] = []
        self.stopped = False
        self.lock = threading.Lock()  # the control socket, `idle` and `stopped`

    def ready(self) -> tuple[list[ArgInfo], list[ArgInfo]]:
        """Waits for the child to load its model: its inputs and outputs.

        Raises:
            RuntimeError: the child could not load the model (ONNX Runtime's message), died,
                answered nonsense or took over LOAD_TIMEOUT_S.
        """
        try:
            header, _ = _receive(self.control, time.monotonic() + LOAD_TIMEOUT_S, grow=True)
            if "error" not in header:
                return _args(header["inputs"]), _args(header["outputs"])
            problem = str(header["error"])  # ONNX Runtime's own message
        except TimeoutError:
            problem = f"its process did not load it within {LOAD_TIMEOUT_S:g} s"
        except (_Closed, OSError, ValueError, KeyError, TypeError):
            problem = ""  # its exit status says why, once it is reaped
        self.stop()
        raise RuntimeError(problem or f"its process failed while loading it ({self.exit_status()})")

    def connection(self) -> socket.socket:
        """An idle connection, or a new one passed to the child."""
        with self.lock:
            if self.idle:
                return self.idle.pop()
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                socket.send_fds(self.control, [b"c"], [theirs.fileno()])
            except OSError:
                mine.close()
                raise
            finally:
                theirs.close()
            return mine

    def give_back(self, sock: socket.socket) -> None:
        with self.lock:
            if self.stopped:
                sock.close()
            else:
                self.idle.append(sock)

    def exit_status(self) -> str:
        code = self.process.poll()
        if code is None:
            return "still running"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit status {code}"

    def stop(self) -> None:
        """Kills the child and reaps it. Killing, not asking: there is nothing it must save,
        and its memory is freed by the kernel, not by a thread of ours under the GIL."""
        with self.lock:
            self.stopped = True
            for sock in self.idle:
                sock.close()
            self.idle.clear()
            self.control.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def _args(described: list[dict[str, Any]]) -> list[ArgInfo]:
    return [ArgInfo(str(a["name"]), str(a["type"]), list(a["shape"])) for a in described]


class ProcessSession:
    """An ONNX Runtime session of one model file, run by a child process.

    Thread-safe as an `InferenceSession` is: each concurrent `run` uses a connection of its
    own. If the child dies or hangs, calls answer `ModelUnavailable` while a new child loads
    the same file; after RESTART_ATTEMPTS failed loads in a row the session stays unhealthy
    (and is never reused by a new version).
    """

    def __init__(
        self, path: Path, label: str, intra_op_threads: int = 1, inter_op_threads: int = 1
    ) -> None:
        """Starts the child and waits until it has loaded `path` (seconds for big models).
        `label` names the model in messages ("model 'trees' version 2").

        Raises:
            RuntimeError: the model cannot be loaded (ONNX Runtime's message), or the child
                died while loading it.
            OSError: the child could not be started.
        """
        self._args = (path, intra_op_threads, inter_op_threads)
        self._label = label
        child = _Child(*self._args)
        self._inputs, self._outputs = child.ready()
        # A one-element list, so the finalizer holds the current child without holding self.
        self._child: list[_Child | None] = [child]
        self._restarting = threading.Lock()
        self._failures = 0
        self.failed = ""  # why the session can no longer be restarted, once that is so
        weakref.finalize(self, _stop, self._child)

    @property
    def pid(self) -> int | None:
        child = self._child[0]
        return None if child is None else child.process.pid

    @property
    def healthy(self) -> bool:
        """A child serves the model now (a new version may share this session)."""
        return self._child[0] is not None

    def get_inputs(self) -> list[ArgInfo]:
        return self._inputs

    def get_outputs(self) -> list[ArgInfo]:
        return self._outputs

    def run(self, output_names: Sequence[str] | None, feed: dict[str, Any]) -> list[Any]:
        """As `InferenceSession.run`: raises ONNX Runtime's own exception types for what the
        model refuses, `InvalidInput` for what cannot be sent to a model process, and
        `ModelUnavailable` while the child is down."""
        child = self._child[0]
        if child is None:
            state = f"cannot be restarted: {self.failed}" if self.failed else "is restarting"
            raise ModelUnavailable(f"the process serving {self._label} {state}; retry")
        names = list(output_names) if output_names else [o.name for o in self._outputs]
        sock = None
        try:
            sock = child.connection()
            _send(sock, {"outputs": names, "inputs": list(feed)}, list(feed.values()))
            header, outputs = _receive(sock, time.monotonic() + CALL_TIMEOUT_S, grow=True)
        except MessageTooLarge as exc:  # nothing was sent: the connection is still in step
            assert sock is not None
            child.give_back(sock)
            raise InvalidInput(f"{self._label} cannot take this request: {exc}") from exc
        except (_Closed, OSError, ValueError, MemoryError) as exc:
            # The connection may be half read: it is never used again, nor is the child.
            if sock is not None:
                sock.close()
            why = _why(child, exc)
            self._lost(child, why)
            raise ModelUnavailable(
                f"the process serving {self._label} {why}; it is restarting, retry"
            ) from exc
        child.give_back(sock)
        if "error" in header:
            raise _ort_error(str(header["error"]), str(header.get("message", "")))
        return outputs

    def _lost(self, child: _Child, why: str) -> None:
        """Starts a replacement for `child`, once, in the background."""
        if not self._restarting.acquire(blocking=False):
            return
        if self._child[0] is not child:  # already replaced, or retired
            self._restarting.release()
            return
        self._child[0] = None
        log.error("the process serving %s %s", self._label, why)
        young = time.monotonic() - child.started < _STEADY_S
        self._failures = self._failures + 1 if young else 1
        threading.Thread(
            target=_restart, args=(weakref.ref(self), child), name="model-restart", daemon=True
        ).start()


RESTART_ATTEMPTS = 5


def _restart(ref: weakref.ref[ProcessSession], dead: _Child) -> None:
    """Replaces `dead` for the session `ref` names, until a child loads or the session is
    gone (retired meanwhile) or RESTART_ATTEMPTS loads failed. Holds the session only while
    it works on it, so a retired session is freed as usual."""
    dead.stop()
    session = ref()
    if session is None:
        return
    try:
        delay = min(_MAX_BACKOFF_S, 0.5 * 2 ** (session._failures - 1))
        path, label = session._args[0], session._label
        for _ in range(RESTART_ATTEMPTS):
            del session  # not held while waiting
            time.sleep(delay)  # a pause between restarts, not synchronisation
            session = ref()
            if session is None:
                return
            try:
                child = _Child(*session._args)
                described = child.ready()
            except (OSError, RuntimeError) as exc:
                log.error("cannot restart the process serving %s: %s", label, exc)
                session.failed = str(exc)
                delay = min(_MAX_BACKOFF_S, delay * 2)
                continue
            if described != (session._inputs, session._outputs):
                child.stop()
                session.failed = f"{path} changed on disk"
                log.error("%s: %s; its process is not restarted", label, session.failed)
                return
            session.failed = ""
            session._child[0] = child
            log.info("process %d serves %s again", child.process.pid, label)
            return
    finally:
        session = ref()
        if session is not None:
            session._restarting.release()


def _why(child: _Child, exc: BaseException) -> str:
    """What went wrong with a call to `child`, for the caller's message."""
    if isinstance(exc, TimeoutError):
        return f"did not answer within {CALL_TIMEOUT_S:g} s"
    if isinstance(exc, ValueError | MemoryError):
        return f"sent a malformed answer ({exc})"
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.process.wait(1.0)  # its sockets closed as it exited: its status is a moment away
    if child.process.poll() is None:
        return "stopped answering"
    return f"ended ({child.exit_status()})"


def _stop(holder: list[_Child | None]) -> None:
    child, holder[0] = holder[0], None
    if child is not None:
        child.stop()


def _ort_error(kind: str, message: str) -> Exception:
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    if kind == "invalid":
        return ort_state.InvalidArgument(message)  # type: ignore[no-any-return]
    return ort_state.Fail(message)  # type: ignore[no-any-return]


# -- the child's side -------------------------------------------------------------------------


def _describe(args: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"name": a.name, "type": a.type, "shape": list(a.shape)} for a in args]


def _closed(sock: socket.socket) -> bool:
    """Whether the peer closed `sock` (without taking anything from it)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _serve(sock: socket.socket, session: Any, invalid: type[Exception]) -> None:
    """Answers one connection's calls, one at a time, until the engine closes it."""
    with sock, contextlib.suppress(_Closed, OSError):
        while True:
            try:
                # Whole messages (the engine checks the bounds before it sends), so a refused
                # one leaves the connection in step.
                header, arrays = _receive(sock)
                feed = dict(zip(header["inputs"], arrays, strict=True))
                outputs = session.run(header["outputs"], feed)
            except invalid as exc:
                _send(sock, {"error": "invalid", "message": str(exc)})
            except Exception as exc:  # each failure is that call's answer
                _send(sock, {"error": "failed", "message": str(exc)})
            else:
                try:
                    _send(sock, {}, outputs)
                except MessageTooLarge as exc:
                    _send(sock, {"error": "failed", "message": f"its outputs are {exc}"})


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve one ONNX model to the engine that started it.")
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--intra-op-threads", type=int, default=1)
    p.add_argument("--inter-op-threads", type=int, default=1)
    p.add_argument("path", type=Path)
    args = p.parse_args(argv)
    # A terminal's Ctrl-C is the engine's to handle. The child ends when the control socket
    # does: when the engine closes it, and when the engine dies, however it dies (its file
    # descriptors close with it; PR_SET_PDEATHSIG would follow the thread that started us).
    # SIGTERM to the engine's process group (a service manager's stop) is ignored too: the
    # engine may be draining, and serving through it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    control = socket.socket(fileno=args.control_fd)

    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.intra_op_threads
    options.inter_op_num_threads = args.inter_op_threads
    options.log_severity_level = 3
    loaded: list[Any] = []

    def load() -> None:
        # Building takes a core for seconds: at a lower priority, so the engine's serving wins
        # the CPU meanwhile. On Linux the niceness is this thread's alone (serving threads,
        # started by the main thread, keep the normal priority); unlike a low-priority thread
        # inside the engine (docs/adr/0003) it holds no lock that serving waits for.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _BUILD_NICENESS)
        try:
            loaded.append(
                ort.InferenceSession(
                    str(args.path), sess_options=options, providers=["CPUExecutionProvider"]
                )
            )
        except Exception as exc:  # whatever ORT raises, the engine reports it as the load error
            loaded.append(exc)

    loader = threading.Thread(target=load, name="load", daemon=True)
    loader.start()
    while loader.is_alive():  # an engine that died while we load gets no orphan
        loader.join(0.5)
        if _closed(control):
            os._exit(0)
    if isinstance(loaded[0], Exception):
        _send(control, {"error": str(loaded[0])})
        return 1
    session = loaded[0]
    _send(
        control,
        {"inputs": _describe(session.get_inputs()), "outputs": _describe(session.get_outputs())},
    )
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(control, 16, 16)
        except OSError:
            fds = []
        if not fds:  # the engine closed the control socket: retired, nothing to free
            os._exit(0)
        for fd in fds:
            threading.Thread(
                target=_serve,
                args=(socket.socket(fileno=fd), session, ort_state.InvalidArgument),
                daemon=True,
            ).start()


if __name__ == "__main__":
    sys.exit(main())
