"""A plain gRPC client host's program, with no SDK: `Engine.Infer` through one channel to a
`dns:///` name with several addresses and gRPC's standard round_robin policy (what a client
of a Kubernetes headless Service does). Prints one JSON object: the versions that answered,
with counts, and the errors.

    python -m tests.cluster._dns_client TARGET WORKSPACE PIPELINE COUNT
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import grpc
import pyarrow as pa

from hotswap.v1 import engine_pb2


def one_row() -> bytes:
    values = pa.array([1.0] * 18, pa.float32())
    table = pa.table({"tensor": pa.FixedSizeListArray.from_arrays(values, 18)})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def main(argv: list[str]) -> int:
    target, workspace, pipeline, count = argv[0], argv[1], argv[2], int(argv[3])
    options = [("grpc.lb_policy_name", "round_robin")]
    request = engine_pb2.InferRequest(workspace=workspace, pipeline=pipeline, arrow=one_row())
    versions: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    with grpc.insecure_channel(target, options=options) as channel:
        infer = channel.unary_unary(
            "/hotswap.v1.Engine/Infer",
            request_serializer=engine_pb2.InferRequest.SerializeToString,
            response_deserializer=engine_pb2.InferResponse.FromString,
        )
        grpc.channel_ready_future(channel).result(timeout=10)
        for _ in range(count):
            try:
                versions[infer(request, timeout=10).pipeline_version] += 1
            except grpc.RpcError as exc:
                errors[exc.code().name] += 1
    print(json.dumps({"versions": versions, "errors": errors}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
