"""KServe's ModelServer serving an ONNX model the way KServe's custom-runtime docs show: a
`kserve.Model` whose `predict` runs ONNX Runtime on the request's first input.

Run with the interpreter of the virtualenv `bench/_peers.py` makes (KServe is never a
dependency of hotswap):

    python bench/peers/kserve_server.py MODEL.onnx --name housing --grpc-port P --http-port Q
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import kserve  # type: ignore[import-not-found]
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse


class OnnxModel(kserve.Model):  # type: ignore[misc]
    def __init__(self, name: str, path: str, threads: int) -> None:
        super().__init__(name)
        self.path = path
        self.threads = threads
        self.load()

    def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0].name
        self.ready = True
        return True

    def predict(self, payload: InferRequest, headers: Any = None, **kwargs: Any) -> InferResponse:
        y = self.session.run(None, {self.input: payload.inputs[0].as_numpy()})[0]
        out = InferOutput(name=self.output, shape=list(y.shape), datatype="FP32")
        out.set_data_from_numpy(y, binary_data=True)
        return InferResponse(response_id=payload.id, model_name=self.name, infer_outputs=[out])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model")
    p.add_argument("--name", default="housing")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    args = p.parse_args()
    sys.argv = sys.argv[:1]  # KServe's own argument parser reads sys.argv too
    model = OnnxModel(args.name, args.model, args.threads)
    kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port).start([model])


if __name__ == "__main__":
    main()
