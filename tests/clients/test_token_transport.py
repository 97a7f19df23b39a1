"""Bearer tokens never travel in cleartext off this machine unless the user asks for it.

No traffic is sent: the refusal happens when the channel is made, before any connection.
Addresses are from 198.18.0.0/15 (the benchmarking range), never dialled here.
"""

from __future__ import annotations

import pytest

import hotswap
from hotswap.clients._rpc import Security, check_token_transport
from hotswap.service.edge import is_loopback


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.8.9.10:1", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("198.18.0.5:50051", False),
        ("engine-1.hotswap.svc:9000", False),
        ("[2001:db8::1]:1", False),
    ],
)
def test_loopback_addresses(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_a_token_is_not_sent_over_plaintext_to_another_host() -> None:
    with pytest.raises(hotswap.InsecureTransportError, match=r"198\.18\.0\.5:50051"):
        hotswap.Client("198.18.0.5:50051", token="a-token-of-sixteen-chars")
    # Engines listed by the control plane get the same check (the SDK's engine channels and
    # the load test use check_token_transport too).
    with pytest.raises(hotswap.InsecureTransportError):
        check_token_transport("198.18.0.7:9000", Security(token="a-token-of-sixteen-chars"))


def test_no_token_or_tls_or_loopback_need_no_opt_in() -> None:
    check_token_transport("198.18.0.5:50051", Security())
    check_token_transport("198.18.0.5:50051", Security(token="t" * 16, ca=b"pem"))
    check_token_transport("127.0.0.1:50051", Security(token="t" * 16))


def test_opting_in_warns() -> None:
    with pytest.warns(hotswap.InsecureTransportWarning, match="plaintext"):
        client = hotswap.Client(
            "198.18.0.5:50051", token="a-token-of-sixteen-chars", allow_plaintext_token=True
        )
    client.close()


def test_an_engine_will_not_send_its_credential_in_cleartext_off_the_host(tmp_path) -> None:
    import subprocess
    import sys

    token = tmp_path / "engine.token"
    token.write_text("engine-token-0123456789abcdef")
    # Refused at start, before anything is bound or dialled.
    proc = subprocess.run(
        [
            sys.executable, "-m", "hotswap.engine", "--control", "198.18.0.1:50051",
            "--control-token-file", str(token), "--cache-dir", str(tmp_path / "cache"),
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "refusing to send the engine credential to 198.18.0.1:50051" in proc.stderr
