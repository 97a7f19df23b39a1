"""tritonclient in a child process, driven over stdin/stdout by the interop tests.

Why a child process: tritonclient's generated code and the engine's register the same
`inference.*` messages in protobuf's default descriptor pool, so one Python process cannot
import both (protobuf raises "duplicate symbol"), and the test suite imports the engine's. The
test talks to this driver in JSON lines: one command in, one answer out.

Commands (`{"op": ..., **args}`):
- `call`: `{"method": "is_server_ready", "kwargs": {...}}` -> the method's result; metadata
  methods are asked for JSON (`as_json=True`).
- `infer`: `{"model", "x": [[...]], "name", "version", "parameters"}` -> the served version,
  the response id and parameters, and every output as a list.
- `load`: starts `threads` threads sending 1-row requests (`x` row i on thread i) until
  `stop`; answers once each thread has had one answer.
- `seen`: -> the versions that have answered so far.
- `stop`: -> `{"requests", "errors", "answers": {version: {row: [distinct values]}}}`.
Errors of a command answer `{"error": {"status", "message"}}`.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

import numpy as np
import tritonclient.grpc as tc  # type: ignore[import-untyped]
from tritonclient.utils import InferenceServerException  # type: ignore[import-untyped]

JSON_METHODS = {"get_server_metadata", "get_model_metadata", "get_model_repository_index"}


def _inputs(x: np.ndarray, name: str) -> list[tc.InferInput]:
    tensor = tc.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return [tensor]


class Load:
    """Threads of 1-row requests, each recording which version answered what."""

    def __init__(self, url: str, model: str, rows: np.ndarray, threads: int) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.requests = 0
        self.errors: list[str] = []
        self.answers: dict[str, dict[int, set[float]]] = {}
        self._started = threading.Semaphore(0)
        self._threads = [
            threading.Thread(target=self._run, args=(url, model, rows[i % len(rows)], i))
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()
        for _ in self._threads:
            if not self._started.acquire(timeout=10):
                raise RuntimeError("load threads did not get a first answer in 10 s")

    def _run(self, url: str, model: str, row: np.ndarray, index: int) -> None:
        client = tc.InferenceServerClient(url=url)
        inputs = _inputs(row.reshape(1, -1).astype(np.float32), "float_input")
        first = True
        while not self._stop.is_set():
            try:
                result = client.infer(model, inputs, client_timeout=10)
                value = float(result.as_numpy("variable").ravel()[0])
                version = result.get_response().model_version
                with self._lock:
                    self.requests += 1
                    self.answers.setdefault(version, {}).setdefault(index, set()).add(value)
            except InferenceServerException as exc:
                with self._lock:
                    self.errors.append(f"{exc.status()}: {exc.message()}")
            if first:
                first = False
                self._started.release()
        client.close()

    def seen(self) -> list[str]:
        with self._lock:
            return sorted(self.answers)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)
        return {
            "requests": self.requests,
            "errors": self.errors[:20],
            "error_count": len(self.errors),
            "answers": {
                version: {str(row): sorted(values) for row, values in rows.items()}
                for version, rows in self.answers.items()
            },
        }


def handle(client: tc.InferenceServerClient, url: str, state: dict[str, Any], cmd: Any) -> Any:
    op = cmd["op"]
    if op == "call":
        method, kwargs = cmd["method"], cmd.get("kwargs", {})
        if method in JSON_METHODS:
            kwargs["as_json"] = True
        return getattr(client, method)(**kwargs)
    if op == "infer":
        x = np.asarray(cmd["x"], dtype=np.float32)
        result = client.infer(
            cmd["model"],
            _inputs(x, cmd.get("name", "float_input")),
            model_version=cmd.get("version", ""),
            parameters=cmd.get("parameters"),
            request_id=cmd.get("id", ""),
        )
        response = result.get_response(as_json=True)
        return {
            "model_name": response["model_name"],
            "model_version": response["model_version"],
            "id": response.get("id", ""),
            "parameters": response.get("parameters", {}),
            "outputs": {
                o["name"]: result.as_numpy(o["name"]).tolist() for o in response["outputs"]
            },
            "shapes": {o["name"]: [int(d) for d in o["shape"]] for o in response["outputs"]},
        }
    if op == "load":
        rows = np.asarray(cmd["x"], dtype=np.float32)
        state["load"] = Load(url, cmd["model"], rows, cmd.get("threads", 2))
        return True
    if op == "seen":
        return state["load"].seen()
    if op == "stop":
        return state.pop("load").stop()
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    url = sys.argv[1]
    client = tc.InferenceServerClient(url=url)
    state: dict[str, Any] = {}
    print(json.dumps({"ok": "ready"}), flush=True)
    for line in sys.stdin:
        started = time.perf_counter()
        try:
            answer = {"ok": handle(client, url, state, json.loads(line))}
        except InferenceServerException as exc:
            answer = {"error": {"status": exc.status(), "message": exc.message()}}
        answer["seconds"] = time.perf_counter() - started
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
