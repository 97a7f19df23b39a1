"""Runs a command as a person's shell would: stderr on a pseudo-terminal of a real size."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import termios
import time


def in_terminal(command: list[str], timeout: float = 60) -> tuple[int, str]:
    """Runs `command` with stderr on a pseudo-terminal (as a person's shell would); returns
    its exit code and what the terminal showed."""
    controller, terminal = pty.openpty()
    # 24 rows of 120 columns: a new pty has 0 columns, where tqdm draws an empty bar.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=terminal)
    os.close(terminal)
    shown = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal closed: the process has exited
                break
            if not chunk:
                break
            shown += chunk
        elif process.poll() is not None:
            break
    os.close(controller)
    return process.wait(timeout=10), shown.decode(errors="replace")
