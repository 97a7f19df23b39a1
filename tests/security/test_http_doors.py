"""The engine's HTTP port on a secured stack: the same tokens as its gRPC services, per
workspace, the same limits; only the two health routes are open, and they name nothing."""

from __future__ import annotations

import http.client
import json
import ssl
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hotswap.clients._stack import LocalStack
from tests.security._certs import make_pki
from tests.security.test_engine_doors import ADMIN, ALICE, BOB, _deploy, secured

__all__ = ["secured"]  # the fixture, shared with the gRPC doors' tests

ROW = np.ones((1, 18), np.float32)
OIP_BODY = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 18], "datatype": "FP32", "data": ROW.ravel().tolist()}]}
).encode()
RECORDS = json.dumps([{"tensor": ROW.ravel().tolist()}]).encode()
RECORDS_TYPE = "application/json; format=pandas-records"


def _call(
    address: str,
    method: str,
    path: str,
    token: str | None = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    connection = http.client.HTTPConnection(address, timeout=10)
    sent = dict(headers or {})
    if token:
        sent["Authorization"] = f"Bearer {token}"
    connection.request(method, path, body=body, headers=sent)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    answer = response.getheader("content-type", "")
    return (
        response.status,
        {k.lower(): v for k, v in response.getheaders()},
        json.loads(data) if answer.startswith("application/json") and data else data,
    )


def test_http_checks_tokens_per_workspace(secured: tuple[LocalStack, Path], assets: Path) -> None:
    stack, _ = secured
    _deploy(stack, ADMIN, "alice-ws", assets / "models" / "rf_model.onnx")
    _deploy(stack, ADMIN, "bob-ws", assets / "models" / "gbr_model.onnx")
    http_address = stack.http_address("engine-1")

    def infer_oip(token: str | None, query: str = "") -> tuple[int, dict[str, str], Any]:
        return _call(http_address, "POST", f"/v2/models/p/infer{query}", token, OIP_BODY)

    def infer_records(token: str | None, workspace: str) -> tuple[int, dict[str, str], Any]:
        path = f"/v1/api/pipelines/infer/{workspace}/p"
        return _call(http_address, "POST", path, token, RECORDS, {"Content-Type": RECORDS_TYPE})

    # No token, or one this stack does not know: every route but health is shut.
    for token in (None, "not-a-token-of-this-stack"):
        status, headers, answer = infer_oip(token)
        assert status == 401, answer
        assert headers["www-authenticate"] == "Bearer"
        assert "outputs" not in answer
        assert infer_records(token, "alice-ws")[0] == 401
        for path in ("/v2", "/v2/models/p", "/v2/models/p/ready"):
            assert _call(http_address, "GET", path, token)[0] == 401, path
    assert _call(http_address, "GET", "/v2/health/live")[0] == 200
    status, _, answer = _call(http_address, "GET", "/v2/health/ready")
    assert (status, answer) == (200, {"ready": True})

    # Alice reaches her workspace's pipeline only, whichever way she names it.
    status, headers, answer = infer_oip(ALICE)
    assert status == 200, answer
    assert headers["x-hotswap-workspace"] == "alice-ws"
    assert answer["parameters"]["workspace"] == "alice-ws"
    assert infer_oip(ALICE, "?workspace=bob-ws")[0] == 403
    status, _, answer = infer_records(ALICE, "bob-ws")
    assert status == 403
    assert "no rights to workspace 'bob-ws'" in answer["error"]
    status, headers, rows = infer_records(ALICE, "alice-ws")
    assert status == 200
    assert headers["x-hotswap-pipeline"] == "p"
    assert len(rows) == 1
    # Bob's "p" is a different model: the answers differ, each from its own workspace.
    status, headers, bob_rows = infer_records(BOB, "bob-ws")
    assert (status, headers["x-hotswap-workspace"]) == (200, "bob-ws")
    assert bob_rows[0]["out"]["variable"] != rows[0]["out"]["variable"]
    # Naming Alice's workspace in the body does not reach it.
    named = json.loads(OIP_BODY)
    named["parameters"] = {"workspace": "alice-ws"}
    status, _, answer = _call(
        http_address, "POST", "/v2/models/p/infer", BOB, json.dumps(named).encode()
    )
    assert status == 400
    assert "outputs" not in answer


@pytest.fixture
def small_stack(tmp_path: Path) -> Any:
    with LocalStack(tmp_path / "stack", engine_args=("--max-rows", "4")) as stack:
        yield stack


def test_http_limits_and_bad_input_answer_what_to_do(small_stack: LocalStack, assets: Path) -> None:
    stack = small_stack
    import hotswap

    client = hotswap.Client(stack.control_address)
    client.set_current_workspace(client.get_workspace("ws", create_if_not_exist=True))
    model = client.upload_model("m", assets / "models" / "rf_model.onnx")
    client.build_pipeline("p").add_model_step(model).deploy()
    address = stack.http_address("engine-1")
    url = "/v1/api/pipelines/infer/ws/p"

    # A body past the limit is refused from its declared length, before it is read.
    connection = http.client.HTTPConnection(address, timeout=10)
    connection.putrequest("POST", url)
    connection.putheader("Content-Type", RECORDS_TYPE)
    connection.putheader("Content-Length", str(65 * 1024 * 1024))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413
    assert "at most 67108864" in json.loads(response.read())["error"]
    connection.close()

    five = json.dumps([{"tensor": ROW.ravel().tolist()}] * 5).encode()
    status, _, answer = _call(address, "POST", url, None, five, {"Content-Type": RECORDS_TYPE})
    assert status == 413
    assert "at most 4 per call" in answer["error"]

    status, _, answer = _call(address, "POST", url, None, b"[{", {"Content-Type": RECORDS_TYPE})
    assert status == 400
    assert "not JSON" in answer["error"]
    status, _, answer = _call(address, "POST", url, None, RECORDS, {"Content-Type": "text/csv"})
    assert status == 415
    assert "application/vnd.apache.arrow.file" in answer["error"]

    short = json.loads(OIP_BODY)
    short["inputs"][0]["data"] = [1.0] * 17
    status, _, answer = _call(
        address, "POST", "/v2/models/p/infer", None, json.dumps(short).encode()
    )
    assert status == 400
    assert "18 values expected, got 17" in answer["error"]
    status, _, answer = _call(address, "POST", "/v2/models/nope/infer", None, OIP_BODY)
    assert status == 404
    assert "nope" in answer["error"]
    # A refused request loses nothing: the next one is served.
    assert _call(address, "POST", url, None, RECORDS, {"Content-Type": RECORDS_TYPE})[0] == 200


def test_a_loopback_engine_answers_only_loopback_host_names(
    small_stack: LocalStack, assets: Path
) -> None:
    """A web page whose name was rebound to 127.0.0.1 (DNS rebinding) sends its own name as
    Host: an engine on loopback refuses it, so a browser cannot reach a laptop's engine."""
    address = small_stack.http_address("engine-1")
    port = address.rsplit(":", 1)[1]
    for host in (f"attacker.example:{port}", "localhost.attacker.example"):
        status, _, answer = _call(address, "GET", "/v2", headers={"Host": host})
        assert status == 403, host
        assert "loopback only" in answer["error"]
        status, _, _ = _call(
            address, "POST", "/v1/api/pipelines/infer/ws/p", None, RECORDS,
            {"Host": host, "Content-Type": RECORDS_TYPE},
        )  # fmt: skip
        assert status == 403
    for host in (address, f"localhost:{port}"):
        assert _call(address, "GET", "/v2", headers={"Host": host})[0] == 200, host


def test_an_engine_with_tls_serves_http_over_tls_only(tmp_path: Path) -> None:
    """The HTTP port speaks TLS with the gRPC server's files: an engine that serves TLS never
    answers plaintext HTTP."""
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    tls = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    with LocalStack(tmp_path / "stack", engine_args=tls) as stack:
        address = stack.http_address("engine-1")
        trusted = ssl.create_default_context(cafile=str(pki.ca))
        connection = http.client.HTTPSConnection(address, timeout=10, context=trusted)
        connection.request("GET", "/v2/health/live")
        answer = connection.getresponse()
        assert (answer.status, json.loads(answer.read())) == (200, {"live": True})
        connection.close()
        plain = http.client.HTTPConnection(address, timeout=10)
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            plain.request("GET", "/v2/health/live")
            plain.getresponse()
        plain.close()
