"""A load client host's program: SDK clients in threads calling `pipeline.infer` back to back
until a stop file appears, each request written as one JSON line to the output file as it
ends (so the test can follow along).

    python -m tests.cluster._load CONTROL WORKSPACE PIPELINE OUT STOP [THREADS]

Each line: {"start": s, "end": s, "ok": bool, "error": str, "version": n, "engine": addr},
times in seconds of the monotonic clock, which every host shares with the test (one kernel).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import pandas as pd

import hotswap

ROW = pd.DataFrame({"tensor": [[1.0] * 18]})


class Out:
    def __init__(self, f: IO[str]) -> None:
        self._f = f
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()


def client(address: str, workspace: str, pipeline_name: str, stop: Path, out: Out) -> None:
    with hotswap.Client(address) as sdk:
        sdk.set_current_workspace(workspace)
        pipeline = sdk.get_pipeline(pipeline_name)
        while not stop.exists():
            record: dict[str, Any] = {"start": time.monotonic(), "ok": True, "error": ""}
            try:
                pipeline.infer(ROW, timeout=15)
                served = pipeline.last_served()
                record["version"] = served.pipeline_version if served else 0
                record["engine"] = served.engine if served else ""
            except hotswap.HotswapError as exc:
                record.update(ok=False, error=f"{type(exc).__name__}: {exc}")
            record["end"] = time.monotonic()
            out.write(record)


def main(argv: list[str]) -> int:
    address, workspace, pipeline, out_path, stop_path = argv[:5]
    threads = int(argv[5]) if len(argv) > 5 else 4
    with Path(out_path).open("w") as f:
        out = Out(f)
        workers = [
            threading.Thread(
                target=client, args=(address, workspace, pipeline, Path(stop_path), out)
            )
            for _ in range(threads)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
