"""Big models in a process of their own, on a real stack: a version served from a model
process answers as in-process ONNX Runtime does, the process ends once its version is
retired, and a model process killed under load costs retriable UNAVAILABLE answers while a
new one loads the model, not a stuck engine."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest

from hotswap.clients._stack import LocalStack
from tests.e2e import _api
from tests.e2e.conftest import seed_models

X = np.random.default_rng(11).random((5, 18), np.float32) * 10
BODY = _api.ipc_stream(_api.tensor_table(X))


def _model_processes(stack: LocalStack) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(stack.processes["engine-1"].pid).children():
        try:  # a child may end between the listing and these reads
            if child.status() != psutil.STATUS_ZOMBIE and any(
                "hotswap.engine.model_process" in part for part in child.cmdline()
            ):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.fixture
def isolating(tmp_path: Path) -> Iterator[LocalStack]:
    """Every model in a process of its own (the tutorial's are far below the default 8 MiB),
    and no retired version kept, so a swap retires the old one at once."""
    args = ("--isolate-above-mb", "0", "--retain-versions", "0")
    with LocalStack(tmp_path / "stack", engine_args=args) as stack:
        yield stack


def _serve(stack: LocalStack, assets: Path) -> tuple[Any, Any]:
    """The tutorial's models uploaded, pipeline `p` serving rf: (control stub, engine stub)."""
    control = _api.control(stack.control_address)
    seed_models(control, assets, "p")
    _api.deploy(control, "p", _api.new_version(control, "p", "rf").number)
    return control, _api.engine(stack.engine_addresses[0])


def test_a_model_process_serves_and_ends_with_its_version(
    isolating: LocalStack, assets: Path
) -> None:
    control, engine = _serve(isolating, assets)
    (first,) = _model_processes(isolating)
    answer = _api.infer(engine, "p", BODY)
    assert (answer.version, answer.models) == (1, ["rf"])
    assert np.array_equal(answer.outputs(), _api.reference(assets / "models/rf_model.onnx", X))

    _api.deploy(control, "p", _api.new_version(control, "p", "gbr").number)
    answer = _api.infer(engine, "p", BODY)
    assert (answer.version, answer.models) == (2, ["gbr"])
    assert np.array_equal(answer.outputs(), _api.reference(assets / "models/gbr_model.onnx", X))
    # rf's version is retired and no request holds it: its process is gone, gbr's serves.
    _api.until(lambda: first.pid not in [p.pid for p in _model_processes(isolating)],
               "rf's model process ended after the swap")  # fmt: skip
    assert len(_model_processes(isolating)) == 1


def test_a_killed_model_process_is_retried_and_replaced(
    isolating: LocalStack, assets: Path
) -> None:
    _, engine = _serve(isolating, assets)
    (child,) = _model_processes(isolating)
    os.kill(child.pid, signal.SIGKILL)
    refusals: list[tuple[grpc.StatusCode, str]] = []
    served = None
    end = time.monotonic() + 30
    while served is None and time.monotonic() < end:
        try:
            served = _api.infer(engine, "p", BODY)
        except grpc.RpcError as exc:
            refusals.append((exc.code(), exc.details() or ""))
    # UNAVAILABLE (what the SDK retries elsewhere) while a new process loaded the model,
    # then served again by that new process, with the same answers.
    assert refusals, "the request after the kill should have met the dead process"
    assert {code for code, _ in refusals} == {grpc.StatusCode.UNAVAILABLE}, refusals
    assert "model 'rf'" in refusals[0][1] and "retry" in refusals[0][1], refusals[0]
    assert served is not None and served.version == 1
    assert np.array_equal(served.outputs(), _api.reference(assets / "models/rf_model.onnx", X))
    (replacement,) = _model_processes(isolating)
    assert replacement.pid != child.pid


@pytest.mark.slow  # kills and stops whole engines (make test-slow; CI runs it)
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_model_processes_end_with_the_engine_however_it_ends(
    isolating: LocalStack, assets: Path, how: signal.Signals
) -> None:
    """SIGKILL leaves no time for any clean-up: the children see their control sockets close
    and exit. SIGTERM (a drain, then a stop) ends them too."""
    _serve(isolating, assets)
    children = _model_processes(isolating)
    assert len(children) == 1
    isolating.processes["engine-1"].send_signal(how)
    isolating.processes["engine-1"].wait(timeout=60)

    def gone() -> bool:
        return all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in children)

    _api.until(gone, f"the model process ended after the engine's {how.name}", timeout=30)
