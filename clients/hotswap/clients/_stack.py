"""A local hotswap stack: one control plane and N engines as separate processes on loopback.

Used by ``hotswap up``, ``hotswap demo`` and the end-to-end tests (which kill and restart its
processes for real).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from hotswap.clients._rpc import Security, open_channel
from hotswap.v1 import control_pb2, control_pb2_grpc

POLL_INTERVAL = 0.02


class StackError(RuntimeError):
    """A process of the local stack failed to start."""


class LocalStack:
    def __init__(
        self,
        data_dir: Path,
        *,
        port: int = 0,
        engines: int = 1,
        threads: int = 1,
        host: str = "127.0.0.1",
        control_args: tuple[str, ...] = (),
        engine_args: tuple[str, ...] = (),
        security: Security | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self._port = port
        self._engines = engines
        self._threads = threads
        self._host = host
        self._control_args = control_args
        self._engine_args = engine_args
        # How this stack's own calls (readiness checks) reach a secured control plane.
        self._security = security
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._addresses: dict[str, str] = {}
        self._logs = self.data_dir / "logs"

    # -- addresses ------------------------------------------------------------------------

    @property
    def control_address(self) -> str:
        return self._addresses["control"]

    @property
    def fleet_address(self) -> str:
        """Where engines connect: the control plane's own port, or its --fleet-listen."""
        path = self.data_dir / "control.address.fleet"
        return path.read_text().strip() if path.is_file() else self.control_address

    @property
    def engine_names(self) -> list[str]:
        return [f"engine-{i}" for i in range(1, self._engines + 1)]

    @property
    def engine_addresses(self) -> list[str]:
        return [self._addresses[n] for n in self.engine_names if n in self._addresses]

    def address_of(self, name: str) -> str:
        return self._addresses[name]

    def http_address(self, name: str) -> str:
        """host:port of engine `name`'s HTTP (OIP REST, Wallaroo's formats)."""
        return (self.data_dir / f"{name}.address.http").read_text().strip()

    @property
    def console_url(self) -> str:
        """The control plane's web console (served on its --http-listen port)."""
        scheme = "https" if "--tls-cert" in self._control_args else "http"
        return f"{scheme}://{self.http_address('control')}/"

    def metrics_address(self, name: str) -> str:
        """host:port of the Prometheus endpoint of `name` ("control" or an engine)."""
        return (self.data_dir / f"{name}.address.metrics").read_text().strip()

    # -- processes ------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> None:
        self._logs.mkdir(parents=True, exist_ok=True)
        address_file = self.data_dir / f"{name}.address"
        address_file.unlink(missing_ok=True)
        Path(f"{address_file}.fleet").unlink(missing_ok=True)
        log = (self._logs / f"{name}.log").open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.processes[name] = subprocess.Popen(
            [sys.executable, *args, "--address-file", str(address_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            # Own process group: Ctrl-C in a terminal reaches `hotswap up`, which stops these.
            start_new_session=True,
        )
        log.close()

    def _wait_address(self, name: str, deadline: float) -> str:
        address_file = self.data_dir / f"{name}.address"
        while time.monotonic() < deadline:
            if address_file.is_file():
                self._addresses[name] = address_file.read_text().strip()
                return self._addresses[name]
            if self.processes[name].poll() is not None:
                raise StackError(f"{name} exited at start:\n{self.log_tail(name)}")
            time.sleep(POLL_INTERVAL)
        raise StackError(f"{name} did not start in time:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self._logs / f"{name}.log"
        if not path.is_file():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def start_control(self, timeout: float = 30.0) -> str:
        # Restarts bind the port of the first start, so engines find the control plane again.
        port = (
            self._addresses["control"].rsplit(":", 1)[1]
            if "control" in self._addresses
            else self._port
        )
        # The console keeps its port across restarts too, so an open page carries on.
        http = self.data_dir / "control.address.http"
        http_port = http.read_text().strip().rsplit(":", 1)[1] if http.is_file() else "0"
        self._spawn(
            "control",
            [
                "-m",
                "hotswap.control",
                "--listen",
                f"{self._host}:{port}",
                "--data-dir",
                str(self.data_dir / "control"),
                "--metrics-port",
                "0",
                "--http-listen",
                f"{self._host}:{http_port}",
                *self._control_args,
            ],
        )
        return self._wait_address("control", time.monotonic() + timeout)

    def start_engine(
        self, name: str, timeout: float = 30.0, engine_args: tuple[str, ...] | None = None
    ) -> str:
        """Starts (or restarts) engine `name`; `engine_args` replaces the stack's for it."""
        # Restarts reuse the same name, port and cache, like a restarted pod with a volume.
        port = self._addresses[name].rsplit(":", 1)[1] if name in self._addresses else "0"
        http = self.data_dir / f"{name}.address.http"
        http_port = http.read_text().strip().rsplit(":", 1)[1] if http.is_file() else "0"
        self._spawn(
            name,
            [
                "-m",
                "hotswap.engine",
                "--control",
                self.fleet_address,
                "--listen",
                f"{self._host}:{port}",
                "--name",
                name,
                "--cache-dir",
                str(self.data_dir / "engines" / name),
                "--threads",
                str(self._threads),
                "--metrics-port",
                "0",
                "--http-listen",
                f"{self._host}:{http_port}",
                # On one machine a drain takes milliseconds; do not wait long for a control
                # plane a test has killed.
                "--drain-timeout",
                "5",
                *(self._engine_args if engine_args is None else engine_args),
            ],
        )
        return self._wait_address(name, time.monotonic() + timeout)

    def start(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        try:
            self.start_control(timeout)
            for name in self.engine_names:
                self.start_engine(name, max(deadline - time.monotonic(), 1.0))
            self.wait_engines_connected(self.engine_names, max(deadline - time.monotonic(), 1.0))
        except BaseException:
            self.stop()
            raise

    def wait_engines_connected(self, names: list[str], timeout: float = 30.0) -> None:
        """Polls the control plane until every engine in `names` is connected."""
        deadline = time.monotonic() + timeout
        with open_channel(self.control_address, self._security) as channel:
            # The generated type stubs are async-only; this is the sync API.
            stub: Any = control_pb2_grpc.ControlPlaneStub(channel)  # type: ignore[arg-type]
            while time.monotonic() < deadline:
                try:
                    engines = stub.ListEngines(control_pb2.ListEnginesRequest(), timeout=2)
                    connected = {e.name for e in engines.engines if e.state == "Connected"}
                    if set(names) <= connected:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(POLL_INTERVAL)
        raise StackError(f"engines {names} did not connect in {timeout:g}s")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.processes[name]
        process.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            process.wait(timeout=30)

    def stop(self, grace: float = 10.0) -> None:
        """Engines first (each drains, with the control plane there to answer), then the
        control plane; whatever has not exited after `grace` seconds is killed."""
        deadline = time.monotonic() + grace
        engines = [p for name, p in self.processes.items() if name != "control"]
        control = [p for name, p in self.processes.items() if name == "control"]
        for group in (engines, control):
            for process in group:
                if process.poll() is None:
                    process.send_signal(signal.SIGCONT)
                    process.terminate()
            for process in group:
                try:
                    process.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main_up(argv: list[str]) -> int:
    """``hotswap up``: run a control plane and N engines until Ctrl-C / SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="hotswap up", description="Run a local control plane and engines on loopback."
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path.home() / ".hotswap" / "up",
        help="state of the stack: database, blobs, caches, logs (default %(default)s)",
    )
    parser.add_argument("--port", type=int, default=50051, help="control plane port (%(default)s)")
    parser.add_argument("--engines", type=int, default=1, help="number of engines (%(default)s)")
    parser.add_argument(
        "--threads", type=int, default=1, help="ONNX Runtime threads per session (%(default)s)"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="processes per engine, sharing its port: the core count uses every core (%(default)s)",
    )
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    stack = LocalStack(
        args.data_dir,
        port=args.port,
        engines=args.engines,
        threads=args.threads,
        engine_args=("--processes", str(args.processes)) if args.processes > 1 else (),
    )
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    try:
        stack.start()
    except StackError as exc:
        print(f"hotswap up: {exc}", file=sys.stderr)
        return 1
    print(
        f"control plane  {stack.control_address}   (export HOTSWAP_ADDRESS={stack.control_address})"
        f"   metrics http://{stack.metrics_address('control')}/metrics"
    )
    print(f"console        {stack.console_url}   (web console: pipelines, swaps, rollback)")
    for name in stack.engine_names:
        processes = f" ({args.processes} processes)" if args.processes > 1 else ""
        print(
            f"{name:<14} {stack.address_of(name)}{processes}"
            f"   http://{stack.http_address(name)}"
            f"   metrics http://{stack.metrics_address(name)}/metrics"
        )
    print(f"data and logs  {args.data_dir}   — Ctrl-C stops everything", flush=True)
    try:
        while not stopping.wait(0.5):
            for name, process in stack.processes.items():
                if process.poll() is not None:
                    print(f"hotswap up: {name} exited:\n{stack.log_tail(name)}", file=sys.stderr)
                    stopping.set()
    finally:
        stack.stop()
    print("stopped", flush=True)
    return 0
