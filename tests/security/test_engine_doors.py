"""The engine's own doors on a secured stack: every service but health checks the tokens the
control plane pushes (as digests), per workspace; engine names are bound to credentials; the
control plane's listings and timeline show only the caller's own."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent import futures
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import hotswap
from hotswap.clients._rpc import Security, open_channel
from hotswap.clients._stack import LocalStack
from hotswap.oip import grpc_service_pb2 as oip
from hotswap.oip import grpc_service_pb2_grpc as oip_grpc
from hotswap.v1 import control_pb2 as c
from hotswap.v1 import control_pb2_grpc as cg
from hotswap.v1 import engine_pb2 as e
from hotswap.v1 import engine_pb2_grpc as eg
from hotswap.v1 import fleet_pb2 as f
from hotswap.v1 import fleet_pb2_grpc as fg
from hotswap.v1 import types_pb2 as t
from tests.e2e import _api
from tests.security._peer import ScriptedEngine

ADMIN = "admin-token-0123456789abcdef"
ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdefgh"
ENGINE = "engine-token-0123456789abcdef"
X = np.ones((1, 18), np.float32)


def _write_tokens(path: Path, users: list[tuple[str, str, str]]) -> None:
    path.write_text(
        json.dumps(
            {
                "users": [{"name": n, "token": tok, "workspaces": [ws]} for n, tok, ws in users],
                "engines": [{"name": "fleet", "token": ENGINE, "names": ["engine-*"]}],
            }
        )
    )


USERS = [("admin", ADMIN, "*"), ("alice", ALICE, "alice-ws"), ("bob", BOB, "bob-ws")]


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[LocalStack, Path]]:
    tokens = tmp_path / "tokens.json"
    _write_tokens(tokens, USERS)
    engine_token = tmp_path / "engine.token"
    engine_token.write_text(ENGINE)
    with LocalStack(
        tmp_path / "stack",
        control_args=("--tokens-file", str(tokens), "--heartbeat-interval", "0.2"),
        engine_args=("--control-token-file", str(engine_token)),
        security=Security(token=ADMIN),
    ) as stack:
        yield stack, tokens


def _deploy(stack: LocalStack, token: str, ws: str, model: Path) -> hotswap.Pipeline:
    client = hotswap.Client(stack.control_address, token=token)
    client.set_current_workspace(client.get_workspace(ws, create_if_not_exist=True))
    return client.build_pipeline("p").add_model_step(client.upload_model("m", model)).deploy()


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as excinfo:
        call()
    return excinfo.value.code()


def _auth(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _body() -> bytes:
    return _api.ipc_stream(_api.tensor_table(X))


def _oip(name: str) -> oip.ModelInferRequest:
    tensor = oip.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 18])
    return oip.ModelInferRequest(model_name=name, inputs=[tensor], raw_input_contents=[X.tobytes()])


def test_engine_services_check_tokens_per_workspace(
    secured: tuple[LocalStack, Path], assets: Path
) -> None:
    stack, tokens = secured
    models = assets / "models"
    _deploy(stack, ADMIN, "alice-ws", models / "rf_model.onnx")
    _deploy(stack, ADMIN, "bob-ws", models / "gbr_model.onnx")
    channel = grpc.insecure_channel(stack.engine_addresses[0])
    engine: Any = eg.EngineStub(channel)  # type: ignore[arg-type]
    inference: Any = oip_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[arg-type]

    def infer(token: str | None, workspace: str) -> e.InferResponse:
        request = e.InferRequest(workspace=workspace, pipeline="p", arrow=_body())
        return engine.Infer(request, metadata=_auth(token), timeout=10)  # type: ignore[no-any-return]

    # No token: every door but health is shut.
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: infer(None, "alice-ws")) == unauthenticated
    assert _code(lambda: inference.ModelInfer(_oip("p"))) == unauthenticated
    assert _code(lambda: inference.RepositoryIndex(oip.RepositoryIndexRequest())) == unauthenticated
    assert _code(lambda: engine.GetStatus(e.GetEngineStatusRequest())) == unauthenticated
    logs_request = t.GetLogsRequest(workspace="", pipeline="p")
    assert _code(lambda: engine.GetLogs(logs_request)) == unauthenticated
    assert _code(lambda: infer("not-a-token-of-this-stack", "alice-ws")) == unauthenticated
    health: Any = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == 1  # SERVING

    # Alice reaches her workspace only, also where a call names none.
    assert _code(lambda: infer(ALICE, "bob-ws")) == grpc.StatusCode.PERMISSION_DENIED
    assert infer(ALICE, "alice-ws").workspace == "alice-ws"
    assert infer(ALICE, "").workspace == "alice-ws"
    answer = inference.ModelInfer(_oip("p"), metadata=_auth(ALICE))
    assert answer.parameters["workspace"].string_param == "alice-ws"
    bob_in_alice = _oip("p")
    bob_in_alice.parameters["workspace"].string_param = "alice-ws"
    code = _code(lambda: inference.ModelInfer(bob_in_alice, metadata=_auth(BOB)))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    for _ in range(2):
        assert infer(BOB, "").workspace == "bob-ws"
    status = engine.GetStatus(e.GetEngineStatusRequest(), metadata=_auth(ALICE))
    assert [p.workspace for p in status.pipelines] == ["alice-ws"]
    index = inference.RepositoryIndex(oip.RepositoryIndexRequest(), metadata=_auth(ALICE))
    assert [m.name for m in index.models] == ["p"]

    # GetLogs without a workspace: Alice's three rows, none of Bob's two.
    def alice_rows() -> int:
        logs = engine.GetLogs(logs_request, metadata=_auth(ALICE))
        return pa.ipc.open_stream(logs.arrow).read_all().num_rows if logs.arrow else 0

    _api.until(lambda: alice_rows() == 3, "alice's three logged requests")

    # Revoking a token reaches the engine without a restart.
    _write_tokens(tokens, [u for u in USERS if u[0] != "alice"])
    _api.until(
        lambda: _raises(lambda: infer(ALICE, "alice-ws"), unauthenticated),
        "the engine to refuse alice's revoked token",
    )
    assert infer(BOB, "bob-ws").workspace == "bob-ws"


def _raises(call: Callable[[], object], code: grpc.StatusCode) -> bool:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code() == code
    return False


def test_engine_credentials_are_bound_to_names_and_blobs(
    secured: tuple[LocalStack, Path], assets: Path
) -> None:
    stack, _ = secured
    pipeline = _deploy(stack, ADMIN, "alice-ws", assets / "models" / "rf_model.onnx")
    sha = pipeline.steps()[0].sha()
    real = stack.engine_addresses[0]

    rogue = ScriptedEngine(stack.control_address, "rogue", token=ENGINE).connect()
    error = rogue.wait_closed()
    assert error is not None and error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "rogue" in (error.details() or "")

    impostor = ScriptedEngine(
        stack.control_address, "engine-1", token=ENGINE, address="127.0.0.1:9"
    ).connect()
    error = impostor.wait_closed()
    assert error is not None and error.code() == grpc.StatusCode.FAILED_PRECONDITION
    # The live engine kept its stream and its address.
    control: Any = cg.ControlPlaneStub(open_channel(stack.control_address, Security(ADMIN)))  # type: ignore[arg-type]
    listed = control.ListEngines(c.ListEnginesRequest())
    assert [(x.name, x.address, x.state) for x in listed.engines] == [
        ("engine-1", real, "Connected")
    ]
    endpoints = control.GetPipelineEndpoints(
        c.GetPipelineEndpointsRequest(workspace="alice-ws", pipeline="p")
    )
    assert list(endpoints.addresses) == [real]

    spare = ScriptedEngine(stack.control_address, "engine-9", token=ENGINE).connect()
    try:
        rules = spare.next("access").access
        assert rules.required and {g.name for g in rules.grants} == {"admin", "alice", "bob"}
        sent = rules.SerializeToString()
        assert all(tok.encode() not in sent for tok in (ADMIN, ALICE, BOB))
        fleet: Any = fg.FleetStub(grpc.insecure_channel(stack.control_address))  # type: ignore[arg-type]

        def fetch(**fields: Any) -> grpc.StatusCode:
            request = f.FetchBlobRequest(**fields)
            return _code(lambda: list(fleet.FetchBlob(request, metadata=_auth(ENGINE))))

        mine = {"engine": "engine-9", "instance_id": spare.instance_id}
        # Not in engine-9's desired state; another engine's name; no name; a path.
        assert fetch(sha256=sha, **mine) == grpc.StatusCode.NOT_FOUND
        wrong_instance = {"engine": "engine-1", "instance_id": spare.instance_id}
        assert fetch(sha256=sha, **wrong_instance) == grpc.StatusCode.PERMISSION_DENIED
        assert fetch(sha256=sha) == grpc.StatusCode.PERMISSION_DENIED
        path = {"sha256": "/etc/hostname", "offset": 1}
        assert fetch(**path, **mine) == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        spare.close()


def test_listings_and_timeline_name_the_authenticated_caller(
    secured: tuple[LocalStack, Path], assets: Path
) -> None:
    stack, _ = secured
    models = assets / "models"
    _deploy(stack, ADMIN, "bob-ws", models / "gbr_model.onnx")
    alice = _deploy(stack, ALICE, "alice-ws", models / "rf_model.onnx")
    control: Any = cg.ControlPlaneStub(open_channel(stack.control_address, Security(ALICE)))  # type: ignore[arg-type]
    listed = control.ListEngines(c.ListEnginesRequest())
    assert [list(x.serving) for x in listed.engines] == [["alice-ws/p@1"]]
    control.Deploy(
        c.DeployRequest(workspace="alice-ws", pipeline="p", version=1, requested_by="admin")
    )
    swaps = control.ListSwaps(c.ListSwapsRequest(workspace="alice-ws", pipeline="p"))
    assert [s.requested_by for s in swaps.swaps] == ["alice (admin)", "alice"]
    assert alice.status()["status"] == "Running"


def test_log_gathering_never_sends_a_callers_token_to_an_engine_address(
    secured: tuple[LocalStack, Path], assets: Path
) -> None:
    """An engine credential may claim any address; the control plane asks engines for logs
    over their own streams, so a spy listening at a claimed address hears nothing."""
    stack, _ = secured
    _deploy(stack, ALICE, "alice-ws", assets / "models" / "rf_model.onnx")
    heard: list[tuple[str, str]] = []

    class Spy(grpc.GenericRpcHandler):
        def service(self, details: Any) -> None:
            heard.extend((k, v) for k, v in details.invocation_metadata if k == "authorization")
            return None

    spy = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[Spy()])
    port = spy.add_insecure_port("127.0.0.1:0")
    spy.start()
    peer = ScriptedEngine(
        stack.control_address, "engine-7", token=ENGINE, address=f"127.0.0.1:{port}"
    ).connect()
    try:
        peer.next("access")
        alice = hotswap.Client(stack.control_address, token=ALICE)
        alice.set_current_workspace("alice-ws")
        pipeline = alice.get_pipeline("p")
        rows: dict[str, Any] = {}

        def read() -> None:
            rows["logs"] = pipeline.logs(limit=5)

        import threading

        reader = threading.Thread(target=read)
        reader.start()
        # The scripted engine is asked on its stream, answers, and the merge goes on.
        query = peer.next("logs").logs
        assert (query.request.workspace, query.request.pipeline) == ("alice-ws", "p")
        peer.send(f.EngineMessage(logs=f.LogsResult(query_id=query.query_id)))
        reader.join(30)
        assert "logs" in rows
        assert heard == []
    finally:
        peer.close()
        spy.stop(0)


def test_open_streams_cannot_starve_callers_and_health_hides_pipelines(
    secured: tuple[LocalStack, Path], assets: Path
) -> None:
    stack, _ = secured
    _deploy(stack, ALICE, "alice-ws", assets / "models" / "rf_model.onnx")
    for address in (stack.engine_addresses[0], stack.control_address):
        channel = grpc.insecure_channel(address)
        health: Any = health_pb2_grpc.HealthStub(channel)
        watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(64)]
        try:
            for watch in watches:
                next(watch)  # each stream is open and has its first status
            extra = health.Watch(health_pb2.HealthCheckRequest())
            assert _code(partial(next, extra)) == grpc.StatusCode.RESOURCE_EXHAUSTED
            # Callers with a token are still served.
            if address == stack.control_address:
                control: Any = cg.ControlPlaneStub(channel)  # type: ignore[arg-type]
                control.ListWorkspaces(c.ListWorkspacesRequest(), metadata=_auth(ADMIN))
            else:
                engine: Any = eg.EngineStub(channel)  # type: ignore[arg-type]
                request = e.InferRequest(workspace="alice-ws", pipeline="p", arrow=_body())
                assert engine.Infer(request, metadata=_auth(ALICE)).workspace == "alice-ws"
        finally:
            for watch in watches:
                watch.cancel()
            channel.close()
    # Without a token, health tells nothing about which pipelines an engine serves.
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(stack.engine_addresses[0]))
    for name in ("hotswap.pipeline/alice-ws/p", "hotswap.pipeline/alice-ws/nope"):
        check = partial(health.Check, health_pb2.HealthCheckRequest(service=name))
        assert _code(check) == grpc.StatusCode.NOT_FOUND


def test_engine_names_and_addresses_are_checked(secured: tuple[LocalStack, Path]) -> None:
    stack, _ = secured
    for name, address in (("engine-" + "x" * 200, "127.0.0.1:1"), ("engine-5", "a" * 300)):
        peer = ScriptedEngine(stack.control_address, name, token=ENGINE, address=address)
        error = peer.connect().wait_closed()
        assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
