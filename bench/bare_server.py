"""The bare reference: the least a Python gRPC model server can do per request.

A grpc.aio server with one raw-bytes method: the request is C-order float32 rows, the answer
the model's first output as raw bytes. No protobuf, no Arrow, no routing, no versions; the
ONNX Runtime call runs on a thread pool like the engine's, so the event loop keeps accepting.
With `--oip` it is the Open Inference Protocol twin: `ModelInfer` only, the first input's raw
FP32 contents in, the first output's raw contents out (what every OIP server must do at least).

    python bench/bare_server.py MODEL.onnx --width 18 [--threads 1] [--oip] --address-file F
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
OIP_SERVICE = "inference.GRPCInferenceService"


def session(model: Path, threads: int) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0 = ORT's default (one per core)
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def oip_handler(sess: Any, width: int, call: Any) -> grpc.GenericRpcHandler:
    """ModelInfer over the protocol's messages: raw FP32 in, raw output out."""
    from hotswap.oip import grpc_service_pb2 as oip

    name = sess.get_inputs()[0].name
    output = sess.get_outputs()[0].name

    def run(request: oip.ModelInferRequest) -> oip.ModelInferResponse:
        x = np.frombuffer(request.raw_input_contents[0], dtype=np.float32).reshape(-1, width)
        y = np.ascontiguousarray(sess.run(None, {name: x})[0])
        return oip.ModelInferResponse(
            model_name=request.model_name,
            id=request.id,
            outputs=[
                oip.ModelInferResponse.InferOutputTensor(
                    name=output, datatype="FP32", shape=list(y.shape)
                )
            ],
            raw_output_contents=[y.tobytes()],
        )

    return grpc.method_handlers_generic_handler(
        OIP_SERVICE,
        {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(
                call(run),
                request_deserializer=oip.ModelInferRequest.FromString,
                response_serializer=oip.ModelInferResponse.SerializeToString,
            )
        },
    )


async def serve(
    model: Path,
    width: int,
    threads: int,
    workers: int,
    address_file: Path,
    inline: bool,
    oip: bool = False,
) -> None:
    sess = session(model, threads)
    name = sess.get_inputs()[0].name
    pool = concurrent.futures.ThreadPoolExecutor(workers)
    loop = asyncio.get_running_loop()

    def call(run: Any) -> Any:
        async def handle(request: Any, context: Any) -> Any:
            if inline:
                return run(request)
            return await loop.run_in_executor(pool, run, request)

        return handle

    def run(body: bytes) -> bytes:
        x = np.frombuffer(body, dtype=np.float32).reshape(-1, width)
        return bytes(np.ascontiguousarray(sess.run(None, {name: x})[0]).data)

    handler = (
        oip_handler(sess, width, call)
        if oip
        else grpc.method_handlers_generic_handler(
            SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(call(run))}
        )
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
    p.add_argument("--oip", action="store_true", help="serve the Open Inference Protocol")
    args = p.parse_args()
    asyncio.run(
        serve(
            args.model,
            args.width,
            args.threads,
            args.workers,
            args.address_file,
            args.inline,
            args.oip,
        )
    )


if __name__ == "__main__":
    main()
