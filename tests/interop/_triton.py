"""The test side of `_triton_driver`: a tritonclient running in a child process."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


class TritonError(Exception):
    """An error tritonclient reported; `status` is e.g. "StatusCode.NOT_FOUND"."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class Triton:
    """Sends commands to the driver and waits (boundedly) for each answer."""

    def __init__(self, url: str, log: Path) -> None:
        self._log = log.open("wb")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.interop._triton_driver", url],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._answer(timeout=30)  # "ready": tritonclient imported

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self._lines.put(line)

    def _answer(self, timeout: float) -> Any:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"tritonclient driver gave no answer in {timeout:g}s") from None
        answer = json.loads(line)
        if "error" in answer:
            raise TritonError(answer["error"]["status"], answer["error"]["message"])
        return answer["ok"]

    def send(self, op: str, timeout: float = 30, **args: Any) -> Any:
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self._process.stdin.flush()
        return self._answer(timeout)

    def call(self, method: str, **kwargs: Any) -> Any:
        return self.send("call", method=method, kwargs=kwargs)

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._reader.join(timeout=5)
        if self._process.stdout is not None:
            self._process.stdout.close()
        self._log.close()
