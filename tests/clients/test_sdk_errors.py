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
    assert len(classes) == 10
    for cls in classes:
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
