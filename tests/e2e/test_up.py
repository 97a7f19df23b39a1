"""`hotswap up`: a control plane and N engines as processes, stopped cleanly by SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from hotswap.v1 import control_pb2 as c
from tests.e2e import _api

UP = "import sys; from hotswap.clients._stack import main_up; sys.exit(main_up(sys.argv[1:]))"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def test_up_runs_engines_and_stops_them_all(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", UP, "--data-dir", str(tmp_path), "--port", "0", "--engines", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as up:
        _check_up(up)


def test_up_with_processes_stops_every_process(tmp_path: Path) -> None:
    command = [sys.executable, "-c", UP, "--data-dir", str(tmp_path), "--port", "0"]
    with subprocess.Popen(
        [*command, "--processes", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as up:
        try:
            lines = _banner(up)
            assert any("engine-1" in x and "(2 processes)" in x for x in lines), lines
            [engine] = [pid for pid in _children(up.pid) if "hotswap.engine" in _cmdline(pid)]
            workers = _children(engine)
            assert len(workers) == 1
            up.send_signal(signal.SIGTERM)
            assert up.wait(timeout=30) == 0
            assert not _alive(engine) and not any(_alive(pid) for pid in workers)
        finally:
            if up.poll() is None:
                up.kill()
                up.wait()


def _banner(up: subprocess.Popen[str]) -> list[str]:
    """What `hotswap up` prints until it says it is ready."""
    assert up.stdout is not None
    lines = []
    for line in up.stdout:
        lines.append(line)
        if "Ctrl-C" in line:
            break
    return lines


def _children(pid: int) -> list[int]:
    return [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and f"PPid:\t{pid}\n" in (p / "status").read_text(errors="replace")
    ]


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_text(errors="replace")


def _check_up(up: subprocess.Popen[str]) -> None:
    try:
        lines = _banner(up)
        control_line = next(x for x in lines if x.startswith("control plane"))
        address = control_line.split()[2]
        engines = _api.control(address).ListEngines(c.ListEnginesRequest()).engines
        assert sorted((e.name, e.state) for e in engines) == [
            ("engine-1", "Connected"),
            ("engine-2", "Connected"),
        ]
        # The banner names the web console, and it answers there.
        [console] = [x.split()[1] for x in lines if x.startswith("console ")]
        with urllib.request.urlopen(console, timeout=10) as page:
            assert b"hotswap console" in page.read()
        children = _children(up.pid)
        assert len(children) == 3
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=30) == 0
        assert not any(_alive(pid) for pid in children)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
