"""Every state, outcome, stage and failure cause the services use has its proto enum twin,
so clients can read typed values instead of parsing strings."""

from __future__ import annotations

import pytest

from hotswap.control import _convert
from hotswap.engine import _convert as engine_convert
from hotswap.engine import errors
from hotswap.v1 import control_pb2, fleet_pb2

OUTCOMES = ("ok", "aborted", "rejected", "running", "interrupted")
STAGES = ("preparing", "prepared", "committing", "committed", "failed", "cancelled")
STATUSES = ("Running", "Starting", "Error", "Lost", "Undeployed")


def _causes() -> set[str]:
    found = set()
    todo: list[type[errors.PrepareError]] = [errors.PrepareError]
    while todo:
        cls = todo.pop()
        found.add(cls.cause)
        todo += cls.__subclasses__()
    return found | {"unexpected"}


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_outcomes(outcome: str) -> None:
    assert _convert.enum_value(control_pb2.SwapOutcome, "SWAP_OUTCOME", outcome) != 0


@pytest.mark.parametrize("stage", STAGES)
def test_stages(stage: str) -> None:
    assert _convert.enum_value(control_pb2.SwapStage, "SWAP_STAGE", stage) != 0


@pytest.mark.parametrize("status", STATUSES)
def test_statuses(status: str) -> None:
    assert _convert.serving_status(status) != 0


def test_every_prepare_failure_cause_is_typed() -> None:
    causes = _causes()
    assert {"fetch", "build", "warmup", "not_prepared", "unexpected"} <= causes
    for cause in causes:
        assert engine_convert.failure_cause(cause) != fleet_pb2.FAILURE_CAUSE_UNSPECIFIED
