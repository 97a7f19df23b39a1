"""The bare reference: the least a Python gRPC model server can do per request.

A grpc.aio server with one raw-bytes method: the request is C-order float32 rows, the answer
the model's first output as raw bytes. No protobuf, no Arrow, no routing, no versions; the
ONNX Runtime call runs on a thread pool like the engine's, so the event loop keeps accepting.

    python bench/bare_server.py MODEL.onnx --width 18 [--threads 1] --address-file F
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

METHOD = "Infer"
SERVICE = "bare.Bare"


def session(model: Path, threads: int) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0 = ORT's default (one per core)
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


async def serve(
    model: Path, width: int, threads: int, workers: int, address_file: Path, inline: bool
) -> None:
    sess = session(model, threads)
    name = sess.get_inputs()[0].name
    pool = concurrent.futures.ThreadPoolExecutor(workers)
    loop = asyncio.get_running_loop()

    def run(body: bytes) -> bytes:
        x = np.frombuffer(body, dtype=np.float32).reshape(-1, width)
        return bytes(np.ascontiguousarray(sess.run(None, {name: x})[0]).data)

    async def infer(body: bytes, context: Any) -> bytes:
        if inline:
            return run(body)
        return await loop.run_in_executor(pool, run, body)

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(infer)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address_file.write_text(f"127.0.0.1:{port}")
    await server.wait_for_termination()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model", type=Path)
    p.add_argument("--width", type=int, default=18)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--address-file", type=Path, required=True)
    p.add_argument("--inline", action="store_true", help="run ORT on the event loop")
    args = p.parse_args()
    asyncio.run(
        serve(args.model, args.width, args.threads, args.workers, args.address_file, args.inline)
    )


if __name__ == "__main__":
    main()
