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

from hotswap.engine.errors import ModelUnavailable

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
# A child that dies this soon after it was started is restarted only after a growing pause.
_STEADY_S = 10.0
_MAX_BACKOFF_S = 30.0
# A child that takes longer to load its model, or to answer one call, is taken for hung:
# killed (and, once it served, restarted). Both bound what a stuck child can hold: the
# engine's one build thread, or one of its inference threads.
LOAD_TIMEOUT_S = 600.0
CALL_TIMEOUT_S = 300.0
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


def _send(sock: socket.socket, header: dict[str, Any], arrays: Sequence[Any] = ()) -> None:
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
    encoded = json.dumps({**header, "tensors": specs}).encode()
    prefix = _PREFIX.pack(len(encoded), sum(b.nbytes for b in buffers))
    parts = [memoryview(prefix), memoryview(encoded), *buffers]
    sent = sock.sendmsg(parts)
    for part in parts:  # what a partial sendmsg left, in order
        size = part.nbytes
        if sent >= size:
            sent -= size
            continue
        sock.sendall(part[sent:])
        sent = 0


def _receive_exactly(sock: socket.socket, size: int) -> bytearray:
    data = bytearray(size)
    view = memoryview(data)
    while view:
        got = sock.recv_into(view)
        if not got:
            raise _Closed
        view = view[got:]
    return data


def _receive(sock: socket.socket) -> tuple[dict[str, Any], list[Any]]:
    """One message: its header and its tensors (numpy arrays over the received bytes).

    Raises:
        _Closed: the peer closed the socket.
        ValueError: the message is malformed (sizes, dtypes or shapes that do not add up).
    """
    header_size, payload_size = _PREFIX.unpack(_receive_exactly(sock, _PREFIX.size))
    if header_size > _MAX_HEADER or payload_size > _MAX_PAYLOAD:
        raise ValueError(f"a message of {header_size} + {payload_size} bytes is over the bound")
    header = json.loads(_receive_exactly(sock, header_size))
    payload = _receive_exactly(sock, payload_size) if payload_size else bytearray()
    arrays: list[Any] = []
    offset = 0
    for spec in header.pop("tensors"):
        shape = tuple(int(d) for d in spec["shape"])
        if any(d < 0 for d in shape):
            raise ValueError(f"a tensor shaped {shape}")
        if spec["dtype"] == _STRING:
            arrays.append(np.array(spec["values"], dtype=object).reshape(shape))
            continue
        if spec["dtype"] not in _DTYPES:
            raise ValueError(f"a tensor of dtype {spec['dtype']!r}")
        dtype = np.dtype(spec["dtype"])
        size = math.prod(shape) * dtype.itemsize
        if offset + size > payload_size:
            raise ValueError("tensors larger than the message")
        arrays.append(np.frombuffer(payload, dtype, math.prod(shape), offset).reshape(shape))
        offset += size
    if offset != payload_size:
        raise ValueError("a message with bytes no tensor holds")
    return header, arrays


# -- the engine's side ------------------------------------------------------------------------


class _Child:
    """One started model process and the sockets to it."""

    def __init__(self, path: Path, intra_op_threads: int, inter_op_threads: int) -> None:
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", __name__, "--control-fd", str(theirs.fileno()),
                 "--intra-op-threads", str(intra_op_threads),
                 "--inter-op-threads", str(inter_op_threads), str(path)],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        finally:
            theirs.close()
        self.started = time.monotonic()
        self.idle: list[socket.socket] = []
        self.lock = threading.Lock()  # the control socket and `idle`

    def ready(self) -> tuple[list[ArgInfo], list[ArgInfo]]:
        """Waits for the child to load its model: its inputs and outputs.

        Raises:
            RuntimeError: the child could not load the model (ONNX Runtime's message), or died.
        """
        self.control.settimeout(LOAD_TIMEOUT_S)
        try:
            header, _ = _receive(self.control)
        except TimeoutError as exc:
            self.stop()
            limit = f"{LOAD_TIMEOUT_S:g} s"
            raise RuntimeError(f"its process did not load it within {limit}") from exc
        except (_Closed, OSError, ValueError) as exc:
            self.stop()
            status = self.exit_status()
            raise RuntimeError(f"its process ended while loading it ({status})") from exc
        self.control.settimeout(None)
        if "error" in header:
            self.stop()
            raise RuntimeError(str(header["error"]))
        return (
            [ArgInfo(a["name"], a["type"], a["shape"]) for a in header["inputs"]],
            [ArgInfo(a["name"], a["type"], a["shape"]) for a in header["outputs"]],
        )

    def connection(self) -> socket.socket:
        """An idle connection, or a new one passed to the child."""
        with self.lock:
            if self.idle:
                return self.idle.pop()
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            mine.settimeout(CALL_TIMEOUT_S)
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
            for sock in self.idle:
                sock.close()
            self.idle.clear()
        self.control.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


class ProcessSession:
    """An ONNX Runtime session of one model file, run by a child process.

    Thread-safe as an `InferenceSession` is: each concurrent `run` uses a connection of its
    own. If the child dies, calls answer `ModelUnavailable` while a new child loads the same
    file (after a growing pause if it keeps dying young).
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
        weakref.finalize(self, _stop, self._child)

    @property
    def pid(self) -> int | None:
        child = self._child[0]
        return None if child is None else child.process.pid

    def get_inputs(self) -> list[ArgInfo]:
        return self._inputs

    def get_outputs(self) -> list[ArgInfo]:
        return self._outputs

    def run(self, output_names: Sequence[str] | None, feed: dict[str, Any]) -> list[Any]:
        """As `InferenceSession.run`: raises ONNX Runtime's own exception types for what the
        model refuses, and `ModelUnavailable` while the child is down."""
        child = self._child[0]
        if child is None:
            raise ModelUnavailable(f"the process serving {self._label} is restarting; retry")
        names = list(output_names) if output_names else [o.name for o in self._outputs]
        sock = None
        try:
            sock = child.connection()
            _send(sock, {"outputs": names, "inputs": list(feed)}, list(feed.values()))
            header, outputs = _receive(sock)
        except (_Closed, OSError, ValueError) as exc:
            # The connection may be half read: it is never used again, nor is the child.
            if sock is not None:
                sock.close()
            why = _why(child, exc)
            self._lost(child, exc)
            raise ModelUnavailable(
                f"the process serving {self._label} {why}; it is restarting, retry"
            ) from exc
        child.give_back(sock)
        if "error" in header:
            raise _ort_error(header["error"], header["message"])
        return outputs

    def _lost(self, child: _Child, exc: BaseException) -> None:
        """Starts a replacement for `child`, once, in the background."""
        if self._child[0] is not child or not self._restarting.acquire(blocking=False):
            return
        self._child[0] = None
        log.error("the process serving %s ended: %s", self._label, exc)
        young = time.monotonic() - child.started < _STEADY_S
        self._failures = self._failures + 1 if young else 1
        threading.Thread(
            target=self._restart, args=(child,), name="model-process-restart", daemon=True
        ).start()

    def _restart(self, dead: _Child) -> None:
        try:
            dead.stop()
            delay = min(_MAX_BACKOFF_S, 0.5 * 2 ** (self._failures - 1))
            while True:
                time.sleep(delay)  # a pause between restarts, not synchronisation
                try:
                    child = _Child(*self._args)
                    inputs, outputs = child.ready()
                except (OSError, RuntimeError) as exc:
                    log.error("cannot restart the process serving %s: %s", self._label, exc)
                    delay = min(_MAX_BACKOFF_S, delay * 2)
                    continue
                if (inputs, outputs) != (self._inputs, self._outputs):
                    child.stop()
                    log.error("%s changed on disk; its process is not restarted", self._label)
                    return
                self._child[0] = child
                log.info("process %d serves %s again", child.process.pid, self._label)
                return
        finally:
            self._restarting.release()


def _why(child: _Child, exc: BaseException) -> str:
    """What went wrong with a call to `child`, for the caller's message."""
    if isinstance(exc, TimeoutError):
        return f"did not answer within {CALL_TIMEOUT_S:g} s"
    if isinstance(exc, ValueError):
        return f"sent a malformed answer ({exc})"
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.process.wait(1.0)  # its sockets closed as it exited: its status is a moment away
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


def _serve(sock: socket.socket, session: Any, invalid: type[Exception]) -> None:
    """Answers one connection's calls, one at a time, until the engine closes it."""
    with sock, contextlib.suppress(_Closed, OSError):
        while True:
            header, arrays = _receive(sock)
            try:
                feed = dict(zip(header["inputs"], arrays, strict=True))
                outputs = session.run(header["outputs"], feed)
            except invalid as exc:
                _send(sock, {"error": "invalid", "message": str(exc)})
            except Exception as exc:  # each failure is that call's answer
                _send(sock, {"error": "failed", "message": str(exc)})
            else:
                _send(sock, {}, outputs)


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
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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

    loader = threading.Thread(target=load, name="load")
    loader.start()
    loader.join()
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
