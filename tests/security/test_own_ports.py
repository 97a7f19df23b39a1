"""Ports with one job: the control plane's Fleet service alone on `--fleet-listen` (so a
firewall or NetworkPolicy can keep everyone but engines off it), and gRPC health alone on
`--health-listen` (plaintext, for probes that speak no TLS). Each serves its own service and
nothing else; the main ports no longer serve what moved."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import hotswap
from hotswap.clients._rpc import Security
from hotswap.clients._stack import LocalStack
from hotswap.v1 import control_pb2 as c
from hotswap.v1 import control_pb2_grpc as cg
from hotswap.v1 import engine_pb2 as e
from hotswap.v1 import engine_pb2_grpc as eg
from hotswap.v1 import fleet_pb2 as f
from hotswap.v1 import fleet_pb2_grpc as fg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return {"control_health": _free_port(), "engine_health": _free_port()}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, ports: dict[str, int]) -> Iterator[LocalStack]:
    with LocalStack(
        tmp_path_factory.mktemp("ports"),
        control_args=(
            "--fleet-listen",
            "127.0.0.1:0",
            "--health-listen",
            f"127.0.0.1:{ports['control_health']}",
        ),
        engine_args=("--health-listen", f"127.0.0.1:{ports['engine_health']}"),
    ) as running:
        yield running


def _code(call: Any, *args: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as excinfo:
        result = call(*args, timeout=5)
        if hasattr(result, "__next__"):  # a stream: the error comes with the first read
            next(result)
    return excinfo.value.code()


def test_engines_connect_and_serve_through_the_fleet_port(stack: LocalStack, assets: Path) -> None:
    assert stack.fleet_address != stack.control_address
    with hotswap.Client(stack.control_address) as client:
        client.set_current_workspace(client.create_workspace("ports"))
        model = client.upload_model("rf", assets / "models" / "rf_model.onnx")
        pipeline = client.build_pipeline("p").add_model_step(model).deploy()
        served = pipeline.infer_from_file(assets / "data" / "xtest-1.df.json")
    assert len(served) == 1


def test_the_api_port_serves_no_fleet_and_the_fleet_port_no_api(stack: LocalStack) -> None:
    with grpc.insecure_channel(stack.control_address) as api:
        fleet_on_api: Any = fg.FleetStub(api)  # type: ignore[arg-type]
        blob = f.FetchBlobRequest(sha256="0" * 64)
        assert _code(fleet_on_api.FetchBlob, blob) == grpc.StatusCode.UNIMPLEMENTED
        hello = f.EngineMessage(hello=f.Hello(name="intruder", address="198.18.0.9:1"))
        assert _code(fleet_on_api.Connect, iter([hello])) == grpc.StatusCode.UNIMPLEMENTED
    with grpc.insecure_channel(stack.fleet_address) as fleet:
        api_on_fleet: Any = cg.ControlPlaneStub(fleet)  # type: ignore[arg-type]
        listing = c.ListWorkspacesRequest()
        assert _code(api_on_fleet.ListWorkspaces, listing) == grpc.StatusCode.UNIMPLEMENTED
        deploy = c.DeployRequest(workspace="ports", pipeline="p", version=1)
        assert _code(api_on_fleet.Deploy, deploy) == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("which", ["control_health", "engine_health"])
def test_the_health_port_answers_health_and_nothing_else(
    stack: LocalStack, ports: dict[str, int], which: str
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{ports[which]}") as channel:
        health: Any = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        overall = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert overall.status == health_pb2.HealthCheckResponse.SERVING
        infer: Any = eg.EngineStub(channel)  # type: ignore[arg-type]
        request = e.InferRequest(workspace="ports", pipeline="p")
        assert _code(infer.Infer, request) == grpc.StatusCode.UNIMPLEMENTED
        api: Any = cg.ControlPlaneStub(channel)  # type: ignore[arg-type]
        listing = c.ListWorkspacesRequest()
        assert _code(api.ListWorkspaces, listing) == grpc.StatusCode.UNIMPLEMENTED
        reflection: Any = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        assert _code(reflection.ServerReflectionInfo, iter([ask])) == (
            grpc.StatusCode.UNIMPLEMENTED
        )


def test_the_fleet_port_checks_engine_credentials_like_the_main_port(tmp_path: Path) -> None:
    """On a secured control plane the Fleet port is no side door: no token, a user's token,
    or an engine credential under a name it is not bound to, are all refused there."""
    admin, engine_token = "admin-token-0123456789abcdef", "engine-token-0123456789abcdef"
    tokens = tmp_path / "tokens.json"
    tokens.write_text(
        json.dumps(
            {
                "users": [{"name": "admin", "token": admin, "workspaces": ["*"]}],
                "engines": [{"name": "fleet", "token": engine_token, "names": ["engine-*"]}],
            }
        )
    )
    with LocalStack(
        tmp_path / "secured",
        engines=0,
        control_args=("--fleet-listen", "127.0.0.1:0", "--tokens-file", str(tokens)),
        security=Security(token=admin),
    ) as stack:
        hello = f.EngineMessage(hello=f.Hello(name="intruder", address="198.18.0.9:1"))
        with grpc.insecure_channel(stack.fleet_address) as fleet:
            stub: Any = fg.FleetStub(fleet)  # type: ignore[arg-type]
            for metadata, code in (
                ((), grpc.StatusCode.UNAUTHENTICATED),
                ((("authorization", f"Bearer {admin}"),), grpc.StatusCode.PERMISSION_DENIED),
                ((("authorization", f"Bearer {engine_token}"),), grpc.StatusCode.PERMISSION_DENIED),
            ):
                with pytest.raises(grpc.RpcError) as refused:
                    next(stub.Connect(iter([hello]), metadata=metadata, timeout=5))
                assert refused.value.code() == code
            blob = f.FetchBlobRequest(sha256="0" * 64, engine="engine-1")
            with pytest.raises(grpc.RpcError) as refused:
                next(stub.FetchBlob(blob, timeout=5))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
