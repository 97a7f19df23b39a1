"""TLS (server and mutual) and bearer tokens, with certificates and tokens made by the test."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message_factory import GetMessageClass

import hotswap
from hotswap.clients._rpc import Security, open_channel
from hotswap.clients._stack import LocalStack
from hotswap.v1 import control_pb2 as c
from hotswap.v1 import control_pb2_grpc as cg
from hotswap.v1 import engine_pb2 as e
from hotswap.v1 import engine_pb2_grpc as eg
from hotswap.v1 import fleet_pb2 as f
from hotswap.v1 import fleet_pb2_grpc as fg
from tests.e2e import _api
from tests.security._certs import Pki, make_pki

ADMIN = "admin-token-0123456789abcdef"
ALICE = "alice-token-0123456789abcdef"
ENGINE = "engine-token-0123456789abcdef"


def _tokens(d: Path) -> tuple[Path, Path]:
    tokens = d / "tokens.json"
    tokens.write_text(
        json.dumps(
            {
                "users": [
                    {"name": "admin", "token": ADMIN, "workspaces": ["*"]},
                    {"name": "alice", "token": ALICE, "workspaces": ["alice-ws"]},
                ],
                "engines": [{"name": "fleet", "token": ENGINE}],
            }
        )
    )
    engine_token = d / "engine.token"
    engine_token.write_text(ENGINE + "\n")
    return tokens, engine_token


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[LocalStack]:
    tokens, engine_token = _tokens(tmp_path)
    with LocalStack(
        tmp_path / "stack",
        control_args=("--tokens-file", str(tokens)),
        engine_args=("--control-token-file", str(engine_token)),
        security=Security(token=ADMIN),
    ) as stack:
        yield stack


def _control(address: str, token: str | None = None, **tls: Any) -> Any:
    channel = open_channel(address, Security(token=token, **tls))
    return cg.ControlPlaneStub(channel)  # type: ignore[arg-type]


def _code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as excinfo:
        call()
    error: Any = excinfo.value
    return error.code(), error.details() or ""


def test_tokens_gate_the_api_by_workspace(secured: LocalStack, assets: Path) -> None:
    address = secured.control_address
    anonymous = _control(address)
    code, message = _code(lambda: anonymous.ListWorkspaces(c.ListWorkspacesRequest()))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "HOTSWAP_TOKEN" in message
    forged = _control(address, "not-a-real-token-at-all")
    code, _ = _code(lambda: forged.ListWorkspaces(c.ListWorkspacesRequest()))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    engine_as_user = _control(address, ENGINE)
    code, _ = _code(lambda: engine_as_user.ListWorkspaces(c.ListWorkspacesRequest()))
    assert code == grpc.StatusCode.PERMISSION_DENIED

    admin = hotswap.Client(address, token=ADMIN)
    admin.create_workspace("ops")
    alice = hotswap.Client(address, token=ALICE)
    ws = alice.create_workspace("alice-ws")
    alice.set_current_workspace(ws)
    model = alice.upload_model("rf", assets / "models" / "rf_model.onnx")
    pipeline = alice.build_pipeline("p").add_model_step(model).deploy()
    x = np.ones((2, 18), np.float32)
    out = pipeline.infer(pa_table(x))
    assert out.num_rows == 2
    assert [w.name() for w in alice.list_workspaces()] == ["alice-ws"]

    with pytest.raises(hotswap.HotswapError) as denied:
        alice.create_workspace("ops2")
    assert "no rights to workspace 'ops2'" in str(denied.value)
    raw_alice = _control(address, ALICE)
    code, message = _code(lambda: raw_alice.ListModels(c.ListModelsRequest(workspace="ops")))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "'alice'" in message
    code, _ = _code(
        lambda: raw_alice.UploadModel(
            iter([c.UploadModelRequest(header=c.UploadModelHeader(workspace="ops", name="m"))])
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED

    # Tokens never reach the logs.
    logs = "".join(secured.log_tail(n, 10_000) for n in ["control", *secured.engine_names])
    assert all(t not in logs for t in (ADMIN, ALICE, ENGINE))


def pa_table(x: np.ndarray) -> Any:
    import pyarrow as pa

    flat = pa.array(x.ravel())
    return pa.table({"tensor": pa.FixedSizeListArray.from_arrays(flat, x.shape[1])})


def test_every_control_plane_method_needs_a_token_and_rollouts_the_workspace(
    secured: LocalStack, assets: Path
) -> None:
    # Every method, including ones added later (rollouts): an anonymous call never gets in.
    channel = grpc.insecure_channel(secured.control_address)
    service = c.DESCRIPTOR.services_by_name["ControlPlane"]
    for method in service.methods:
        path = f"/{service.full_name}/{method.name}"
        request: Any = GetMessageClass(method.input_type)()
        if "workspace" in method.input_type.fields_by_name:
            request.workspace = "alice-ws"
        if method.client_streaming:
            call: Any = channel.stream_unary(
                path, request_serializer=lambda m: m.SerializeToString()
            )
            code, _ = _code(partial(call, iter([request])))
        else:
            call = channel.unary_unary(path, request_serializer=lambda m: m.SerializeToString())
            code, _ = _code(partial(call, request))
        assert code == grpc.StatusCode.UNAUTHENTICATED, method.name

    admin = hotswap.Client(secured.control_address, token=ADMIN)
    admin.set_current_workspace(admin.create_workspace("ops"))
    rf = admin.upload_model("rf", assets / "models" / "rf_model.onnx")
    gbr = admin.upload_model("gbr", assets / "models" / "gbr_model.onnx")
    admin.build_pipeline("p").add_model_step(rf).deploy()
    alice = _control(secured.control_address, ALICE)
    for call in (
        lambda: alice.StartRollout(
            c.StartRolloutRequest(workspace="ops", pipeline="p", model=c.StepRef(model="gbr"))
        ),
        lambda: alice.GetRollout(c.GetRolloutRequest(workspace="ops", pipeline="p")),
        lambda: alice.AbortRollout(c.AbortRolloutRequest(workspace="ops", pipeline="p")),
    ):
        code, message = _code(call)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "'ops'" in message
    assert admin.get_pipeline("p").deployed_version().steps()[0].name() == "rf"  # type: ignore[union-attr]
    # The workspace's own token may: the rollout's swaps name who started it.
    rollout = admin.get_pipeline("p").rollout(gbr, steps=(100,), step_seconds=0.1).wait(30)
    assert rollout.state() == "completed"
    assert admin.get_pipeline("p").swaps(1)[0]["requested_by"].endswith("(admin)")


def test_fleet_needs_the_engine_credential(secured: LocalStack) -> None:
    channel = open_channel(secured.control_address, Security(token=ADMIN))
    fleet: Any = fg.FleetStub(channel)  # type: ignore[arg-type]
    hello = f.EngineMessage(hello=f.Hello(name="impostor", address="127.0.0.1:1"))
    code, message = _code(lambda: list(fleet.Connect(iter([hello]))))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "engine credentials" in message

    # An engine started without its token never joins the fleet.
    secured.start_engine("no-token", engine_args=())
    _api.until(
        lambda: "UNAUTHENTICATED" in secured.log_tail("no-token", 50),
        "the tokenless engine to be refused",
    )
    admin = _control(secured.control_address, ADMIN)
    engines = admin.ListEngines(c.ListEnginesRequest()).engines
    assert [e.name for e in engines] == ["engine-1"]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    (tmp_path / "pki").mkdir()
    return make_pki(tmp_path / "pki")


def test_mutual_tls_end_to_end(tmp_path: Path, pki: Pki, assets: Path) -> None:
    tls = Security(
        ca=pki.ca.read_bytes(), cert=pki.client_cert.read_bytes(), key=pki.client_key.read_bytes()
    )
    with LocalStack(
        tmp_path / "stack",
        control_args=(
            "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
            "--tls-client-ca", str(pki.ca),
        ),
        engine_args=(
            "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
            "--tls-client-ca", str(pki.ca),
            "--control-ca", str(pki.ca), "--control-cert", str(pki.client_cert),
            "--control-key", str(pki.client_key),
        ),
        security=tls,
    ) as stack:  # fmt: skip
        client = hotswap.Client(
            stack.control_address,
            tls_ca=pki.ca,
            tls_cert=pki.client_cert,
            tls_key=pki.client_key,
        )
        model = client.upload_model("rf", assets / "models" / "rf_model.onnx")
        pipeline = client.build_pipeline("p").add_model_step(model).deploy()
        assert pipeline.infer(pa_table(np.ones((3, 18), np.float32))).num_rows == 3
        assert "mutual TLS" in stack.log_tail("control", 50)

        for name, stub in {
            "plaintext": _control(stack.control_address),
            "no client certificate": _control(stack.control_address, ca=pki.ca.read_bytes()),
            "untrusted server": _control(
                stack.control_address,
                ca=pki.other_ca.read_bytes(),
                cert=pki.client_cert.read_bytes(),
                key=pki.client_key.read_bytes(),
            ),
        }.items():
            code, _ = _code(partial(stub.ListWorkspaces, c.ListWorkspacesRequest(), timeout=5))
            assert code == grpc.StatusCode.UNAVAILABLE, name
        # The engine's own port asks for client certificates too (--tls-client-ca).
        request = e.GetEngineStatusRequest()
        for name, security in {
            "no client certificate": Security(ca=pki.ca.read_bytes()),
            "plaintext": Security(),
        }.items():
            engine: Any = eg.EngineStub(open_channel(stack.engine_addresses[0], security))  # type: ignore[arg-type]
            code, _ = _code(partial(engine.GetStatus, request, timeout=5))
            assert code == grpc.StatusCode.UNAVAILABLE, name
        engine = eg.EngineStub(open_channel(stack.engine_addresses[0], tls))  # type: ignore[arg-type]
        assert engine.GetStatus(request, timeout=5).name == "engine-1"


def test_loadtest_carries_the_token(secured: LocalStack, assets: Path, tmp_path: Path) -> None:
    admin = hotswap.Client(secured.control_address, token=ADMIN)
    model = admin.upload_model("rf", assets / "models" / "rf_model.onnx")
    admin.build_pipeline("p").add_model_step(model).deploy()
    base = [
        sys.executable, "-m", "hotswap.clients.loadtest", "p", "--address", secured.control_address,
        "--workspace", "default", "--requests", "40", "--quiet",
    ]  # fmt: skip
    refused = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "token" in refused.stderr
    report = tmp_path / "load.json"
    done = subprocess.run(
        [*base, "--token", ADMIN, "--report", str(report)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(report.read_text())
    assert result["latency_ms"]["count"] == 40
    assert sum(result["errors"].values()) == 0
