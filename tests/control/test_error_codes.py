"""Every domain error class, on both servers, maps to a gRPC status code."""

from __future__ import annotations

import grpc
import pytest

from hotswap.control import errors as control_errors
from hotswap.control.servicers import STATUS as CONTROL_STATUS
from hotswap.engine import errors as engine_errors
from hotswap.engine.servicers import STATUS as ENGINE_STATUS
from hotswap.service import edge as _edge


def _subclasses(base: type[Exception]) -> list[type[Exception]]:
    found = []
    for cls in base.__subclasses__():
        found += [cls, *_subclasses(cls)]
    return found


@pytest.mark.parametrize("cls", _subclasses(control_errors.ControlError))
def test_control_errors_have_codes(cls: type[Exception]) -> None:
    assert _edge.status_for(CONTROL_STATUS, cls("x")) is not None


def test_engine_request_errors_have_codes() -> None:
    # PrepareError travels in PrepareResult on the fleet stream, never as an RPC status.
    request_errors = [
        c
        for c in _subclasses(engine_errors.EngineError)
        if not issubclass(c, engine_errors.PrepareError)
    ]
    assert request_errors
    for cls in request_errors:
        assert _edge.status_for(ENGINE_STATUS, cls("x")) is not None


def test_most_specific_class_wins() -> None:
    class Specific(control_errors.NotFound):
        pass

    table: _edge.StatusTable = {
        control_errors.NotFound: grpc.StatusCode.NOT_FOUND,
        Specific: grpc.StatusCode.ABORTED,
    }
    assert _edge.status_for(table, Specific("x")) == grpc.StatusCode.ABORTED
    assert _edge.status_for(table, ValueError("x")) is None
