"""The SDK's error tree and its mapping from gRPC status codes."""

from __future__ import annotations

import grpc
import pytest

import hotswap
from hotswap.clients import _errors
from hotswap.clients._errors import (
    ConcurrentDeployError,
    DeploymentError,
    EntityExistsError,
    EntityNotFoundError,
    HotswapError,
    HotswapTimeoutError,
    InferenceTimeoutError,
    InvalidInputError,
    LimitExceededError,
    ServerError,
    UnavailableError,
    error_for_status,
)

# The codes the control plane and engines return on purpose (design.md, the protos).
SERVER_CODES = {
    grpc.StatusCode.NOT_FOUND: EntityNotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.FAILED_PRECONDITION: DeploymentError,
    grpc.StatusCode.ABORTED: ConcurrentDeployError,
    grpc.StatusCode.ALREADY_EXISTS: EntityExistsError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: LimitExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: HotswapTimeoutError,
}


@pytest.mark.parametrize(
    ("code", "cls"), SERVER_CODES.items(), ids=lambda v: getattr(v, "name", "")
)
def test_each_server_code_maps_to_its_class(code: grpc.StatusCode, cls: type[HotswapError]) -> None:
    err = error_for_status(code, "pipeline 'p' not found")
    assert type(err) is cls
    assert err.code is code
    assert str(err) == err.message == "pipeline 'p' not found"


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK])
def test_every_status_code_becomes_a_hotswap_error(code: grpc.StatusCode) -> None:
    err = error_for_status(code, "boom")
    assert isinstance(err, HotswapError)
    assert err.code is code
    assert "boom" in str(err)


def test_unexpected_codes_are_server_errors_naming_the_code() -> None:
    err = error_for_status(grpc.StatusCode.INTERNAL, "disk full")
    assert isinstance(err, ServerError)
    assert str(err) == "INTERNAL: disk full"


def test_every_error_class_has_a_code_that_maps_back_to_it() -> None:
    classes = [
        c
        for c in vars(_errors).values()
        if isinstance(c, type) and issubclass(c, HotswapError) and c is not HotswapError
    ]
    assert len(classes) == 15
    # Raised by the SDK itself before any call is made: no status code behind it.
    sdk_only = {_errors.InsecureTransportError}
    for cls in classes:
        if cls in sdk_only:
            assert cls.code is None
            continue
        assert cls.code is not None, cls
        mapped = error_for_status(cls.code, "x")
        # Inference timeouts are told apart from other deadlines where the call is made.
        expected = HotswapTimeoutError if cls is InferenceTimeoutError else cls
        assert type(mapped) is expected, cls


def test_subclassing_lets_callers_catch_broadly() -> None:
    assert issubclass(ConcurrentDeployError, DeploymentError)
    assert issubclass(InferenceTimeoutError, TimeoutError)
    assert issubclass(InferenceTimeoutError, HotswapError)


def test_errors_are_exported_from_the_top_level_package() -> None:
    for name in _errors.__all__:
        if name[0].isupper():
            assert getattr(hotswap, name) is getattr(_errors, name)


def test_an_empty_message_still_says_something() -> None:
    assert str(error_for_status(grpc.StatusCode.NOT_FOUND, "")) == "not found"


def _codes_the_servers_send() -> set[grpc.StatusCode]:
    """Every status code named in the servers' code (tables and direct aborts alike)."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    sources = [
        *(repo / "control").rglob("*.py"),
        *(repo / "engine").rglob("*.py"),
        *(repo / "protos" / "hotswap" / "service").rglob("*.py"),
    ]
    names = {
        name
        for path in sources
        for name in re.findall(r"grpc\.StatusCode\.([A-Z_]+)", path.read_text())
    }
    return {grpc.StatusCode[name] for name in names} - {grpc.StatusCode.OK}


def test_every_code_the_servers_send_has_its_own_error_class() -> None:
    codes = _codes_the_servers_send()
    # The enumeration finds the auth codes and the data-loss code among them.
    assert {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.DATA_LOSS,
    } <= codes
    unmapped = sorted(
        code.name for code in codes if type(error_for_status(code, "x")) is ServerError
    )
    assert unmapped == []


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, hotswap.AuthenticationError),
        (grpc.StatusCode.PERMISSION_DENIED, hotswap.PermissionDeniedError),
        (grpc.StatusCode.DATA_LOSS, hotswap.DataLossError),
        (grpc.StatusCode.CANCELLED, hotswap.CancelledError),
    ],
)
def test_auth_and_data_loss_are_not_server_bugs(code: grpc.StatusCode, cls: type) -> None:
    error = error_for_status(code, "the server's words")
    assert type(error) is cls and error.code == code and str(error) == "the server's words"
