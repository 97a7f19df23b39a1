"""The console gateway's fixed parts, without a server: every status the API sends has its
HTTP status, the allowlist holds only unary methods, and which Host names an open console
answers."""

from __future__ import annotations

import grpc

from hotswap.control._auth_interceptor import DENIALS
from hotswap.control.console.gateway import HTTP_STATUS, METHODS, SERVICE
from hotswap.control.servicers import STATUS


def test_every_status_the_api_sends_has_its_http_status() -> None:
    sent = set(STATUS.values()) | set(DENIALS.values())
    # A corrupt blob is the server's fault: 500 is right for it.
    assert sent - set(HTTP_STATUS) == {grpc.StatusCode.DATA_LOSS}
    assert all(400 <= status < 600 for status in HTTP_STATUS.values())


def test_the_allowlist_is_unary_and_writes_only_by_deploy() -> None:
    for name in METHODS:
        method = SERVICE.methods_by_name[name]
        assert not (method.client_streaming or method.server_streaming), name
    assert [m for m in METHODS if not m.startswith(("List", "Get"))] == ["Deploy"]
