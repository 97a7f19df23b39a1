"""The web console's doors on real stacks, without a browser: its gateway refuses what the gRPC
API refuses (no token, another workspace's token) and everything the page does not need
(other methods, big bodies, other content types, other sites' pages, rebinding host names);
its page is self-contained under a strict content security policy."""

from __future__ import annotations

import http.client
import json
import re
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

import hotswap
from hotswap.clients._rpc import Security
from hotswap.clients._stack import LocalStack
from hotswap.control.console.app import ASSETS
from hotswap.control.console.gateway import MAX_BODY_BYTES
from tests.e2e._console import ADMIN, ALICE, BOB, WS, post, secured_stack
from tests.security._certs import make_pki

CSP = "default-src 'self'; frame-ancestors 'none'"


@pytest.fixture
def secured(tmp_path: Path, assets: Path) -> Iterator[LocalStack]:
    """Alice's pipeline `p` deployed at v1 in her workspace."""
    with secured_stack(tmp_path) as stack:
        hotswap.Client(stack.control_address, token=ADMIN).create_workspace(WS)
        alice = hotswap.Client(stack.control_address, token=ALICE)
        alice.set_current_workspace(alice.get_workspace(WS))
        rf = alice.upload_model("rf", assets / "models" / "rf_model.onnx")
        alice.build_pipeline("p").add_model_step(rf).deploy()
        yield stack


@pytest.fixture
def open_stack(tmp_path: Path) -> Iterator[LocalStack]:
    with LocalStack(tmp_path / "stack") as stack:
        yield stack


def _deployed(stack: LocalStack) -> int:
    status, _, body = post(stack.console_url, "GetPipelineStatus",
                           {"workspace": WS, "pipeline": "p"}, token=ALICE)  # fmt: skip
    assert status == 200, body
    return int(body["deployed"]["number"])


DEPLOY = {"workspace": WS, "pipeline": "p", "version": 1, "requested_by": "console"}


def test_without_a_token_the_gateway_answers_401_and_nothing_else(secured: LocalStack) -> None:
    url = secured.console_url
    for method, body in (
        ("ListWorkspaces", {}),
        ("ListPipelines", {"workspace": WS}),
        ("GetPipelineStatus", {"workspace": WS, "pipeline": "p"}),
        ("ListEngines", {}),
        ("Deploy", DEPLOY),
    ):
        for token in (None, "not-a-token-of-this-stack"):
            status, headers, answer = post(url, method, body, token=token)
            assert status == 401, (method, token, answer)
            assert list(answer) == ["error"] and "token" in answer["error"]
            assert "rf" not in str(answer) and "engine-1" not in str(answer)
            assert headers["cache-control"] == "no-store"
    # A malformed header is refused before it reaches the API.
    status, _, _ = post(url, "ListEngines", headers={"Authorization": "Bearer \x7f"})
    assert status == 400


def test_a_token_of_another_workspace_gets_403_for_it(secured: LocalStack) -> None:
    url = secured.console_url
    ask = {"workspace": WS, "pipeline": "p"}
    for method, body in (
        ("GetPipelineStatus", ask),
        ("ListPipelineVersions", ask),
        ("ListSwaps", ask),
        ("ListPipelines", {"workspace": WS}),
        ("Deploy", {**DEPLOY, "expected_current_version": 1}),
    ):
        status, _, answer = post(url, method, body, token=BOB)
        assert status == 403, (method, answer)
        assert "no rights to workspace" in answer["error"]
    # Bob's listings do not show Alice's workspace, nor the engine's pipeline of it.
    _, _, workspaces = post(url, "ListWorkspaces", token=BOB)
    assert [w["name"] for w in workspaces["workspaces"]] == []
    _, _, engines = post(url, "ListEngines", token=BOB)
    assert [e["serving"] for e in engines["engines"]] == [[]]
    # Alice's own token works, and a compare-and-set against a stale version is a conflict.
    assert _deployed(secured) == 1
    status, _, answer = post(url, "Deploy", {**DEPLOY, "expected_current_version": 7}, token=ALICE)
    assert status == 409, answer
    assert _deployed(secured) == 1


def test_only_the_pages_methods_are_served(secured: LocalStack) -> None:
    url = secured.console_url
    for method in ("UploadModel", "CreateWorkspace", "CreatePipeline", "CreatePipelineVersion",
                   "Undeploy", "StartRollout", "GetPipelineLogs", "Connect", "FetchBlob",
                   "hotswap.v1.Fleet/Connect", "Check", "..%2FListEngines"):  # fmt: skip
        status, _, answer = post(url, method, {"name": "made-by-console"}, token=ADMIN)
        assert status == 404, (method, answer)
    _, _, workspaces = post(url, "ListWorkspaces", token=ADMIN)
    assert "made-by-console" not in str(workspaces)
    # The page's own methods answer, and unknown fields are refused, not ignored.
    assert post(url, "ListEngines", token=ADMIN)[0] == 200
    status, _, answer = post(url, "ListEngines", {"surprise": 1}, token=ADMIN)
    assert status == 400, answer


def test_bodies_are_bounded_json_from_the_console_itself(secured: LocalStack) -> None:
    url = secured.console_url
    big = b'{"workspace": "' + b"a" * MAX_BODY_BYTES + b'", "pipeline": "p"}'
    # Without a Content-Length (chunked), the body is counted as it arrives.
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    connection.request("POST", "/api/GetPipelineStatus", body=iter([big[:1000], big[1000:]]),
                       headers={"Content-Type": "application/json",
                                "Authorization": f"Bearer {ADMIN}"},
                       encode_chunked=True)  # fmt: skip
    response = connection.getresponse()
    assert response.status == 413
    response.read()
    connection.close()
    # A body declared too big is refused at once, before any of it is waited for (so a client
    # that writes the whole body before reading, as urllib does, may see the connection
    # close under it instead: this one sends only the headers).
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=5)
    connection.putrequest("POST", "/api/GetPipelineStatus")
    for name, value in (("Content-Type", "application/json"), ("Authorization", f"Bearer {ADMIN}"),
                        ("Content-Length", str(MAX_BODY_BYTES + 1))):  # fmt: skip
        connection.putheader(name, value)
    connection.endheaders(b"{}")
    response = connection.getresponse()
    assert response.status == 413
    assert str(MAX_BODY_BYTES) in response.read().decode()  # says what the limit is
    connection.close()
    # A form or text (what another site's page may send without asking) is refused.
    for kind in ("text/plain", "application/x-www-form-urlencoded"):
        status, _, _ = post(url, "Deploy", DEPLOY, token=ADMIN, headers={"Content-Type": kind})
        assert status == 415, kind
    status, _, answer = post(url, "ListEngines", token=ADMIN,
                             headers={"Origin": "https://evil.example"})  # fmt: skip
    assert status == 403, answer
    assert post(url, "ListEngines", token=ADMIN, headers={"Origin": url.rstrip("/")})[0] == 200


def _get(url: str) -> tuple[dict[str, str], str]:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return {k.lower(): v for k, v in answer.headers.items()}, answer.read().decode()


def test_the_page_is_self_contained_under_a_strict_policy(open_stack: LocalStack) -> None:
    url = open_stack.console_url
    own = urlsplit(url).netloc
    for path in ASSETS:
        headers, text = _get(url + path.lstrip("/"))
        assert headers["content-security-policy"] == CSP
        assert headers["x-content-type-options"] == "nosniff"
        for link in re.findall(r"(?:https?:)?//[A-Za-z0-9.\-:\[\]]+", text):
            assert urlsplit(link).netloc in ("", own), f"{path} refers to {link}"
        # Server data is written as text only: no markup from strings anywhere.
        assert "innerHTML" not in text and "insertAdjacentHTML" not in text
    index = _get(url)[1]
    assert '<script src="/console.js"' in index and "<style" not in index
    assert not re.search(r"<script>|\son\w+=", index)  # no inline code for the CSP to refuse
    _, headers, _ = post(url, "ListEngines")
    assert headers["content-security-policy"] == CSP and headers["cache-control"] == "no-store"


def test_an_open_console_names_the_browser_and_answers_only_by_address(
    open_stack: LocalStack, assets: Path
) -> None:
    url = open_stack.console_url
    with hotswap.Client(open_stack.control_address) as wl:
        wl.set_current_workspace(wl.create_workspace(WS))
        rf = wl.upload_model("rf", assets / "models" / "rf_model.onnx")
        gbr = wl.upload_model("gbr", assets / "models" / "gbr_model.onnx")
        wl.build_pipeline("p").add_model_step(rf).deploy().replace_with_model_step(0, gbr).deploy()
    # A forwarded-for header names no one: the address is the connection's own.
    forged = {"X-Forwarded-For": "10.9.8.7", "X-Forwarded-Proto": "https"}
    deploy = {**DEPLOY, "expected_current_version": 2}
    status, _, answer = post(url, "Deploy", deploy, headers=forged)
    assert status == 200, answer
    _, _, swaps = post(url, "ListSwaps", {"workspace": WS, "pipeline": "p"})
    who = swaps["swaps"][0]["requested_by"]
    assert re.fullmatch(r"unauthenticated console 127\.0\.0\.1:\d+ \(console\)", who), who
    # A site that rebinds its own name to this address reaches a page that will not answer.
    request: Any = urllib.request.Request(url, headers={"Host": "evil.example"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 421
    refused.value.close()
    status, _, _ = post(url, "ListEngines", headers={"Host": "evil.example"})
    assert status == 421
    assert post(url.replace("127.0.0.1", "localhost"), "ListEngines")[0] == 200


def test_a_tls_control_plane_serves_the_console_over_https_only(tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    tls = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    with LocalStack(
        tmp_path / "stack",
        control_args=tls,
        engine_args=("--control-ca", str(pki.ca)),
        security=Security(ca=pki.ca.read_bytes()),
    ) as stack:
        url = stack.console_url
        assert url.startswith("https://")
        trusted = ssl.create_default_context(cafile=str(pki.ca))
        with urllib.request.urlopen(url, timeout=10, context=trusted) as page:
            assert page.status == 200
        request = urllib.request.Request(f"{url}api/ListEngines", data=b"{}",
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=10, context=trusted) as answer:
            assert [e["name"] for e in json.loads(answer.read())["engines"]] == ["engine-1"]
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(url.replace("https://", "http://"), timeout=10)
