"""The headline guarantee: swaps under continuous load fail no request, never mix versions,
and are visible to every request that starts after Deploy returns (read-your-writes)."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from hotswap.clients._stack import LocalStack
from tests.e2e import _api
from tests.e2e.conftest import MODELS, seed_models

CLIENTS = 4
SWAPS = 21
ROWS = 8
PER_VERSION = 40  # answers each version must give before the next swap


def _wait_served(served: list[Served], version: int, count: int) -> None:
    _api.until(
        lambda: sum(1 for s in served[-count * 4 :] if s.version == version) >= count,
        f"{count} answers from version {version}",
        interval=0.005,
    )


@dataclass(frozen=True)
class Served:
    started: float
    finished: float
    version: int
    models: tuple[str, ...]
    values: bytes  # the outputs, to compare with what the claimed model gives


def _load(
    addresses: list[str], body: bytes, stop: threading.Event, log: list[Served], errors: list[str]
) -> None:
    engines = itertools.cycle([_api.engine(a) for a in addresses])
    while not stop.is_set():
        started = time.monotonic()
        try:
            answer = _api.infer(next(engines), "housing", body)
        except grpc.RpcError as exc:
            errors.append(f"{exc.code().name}: {exc.details()}")
            continue
        log.append(
            Served(
                started,
                time.monotonic(),
                answer.version,
                tuple(answer.models),
                answer.outputs().tobytes(),
            )
        )


def test_swaps_under_load_lose_nothing_and_never_mix(
    stack2: LocalStack, assets: Path, xtest: np.ndarray
) -> None:
    stub = _api.control(stack2.control_address)
    seed_models(stub, assets)
    x = xtest[:ROWS]
    expected = {
        m: _api.reference(assets / "models" / f"{m}_model.onnx", x).tobytes() for m in MODELS
    }
    model_of: dict[int, str] = {}
    first = _api.new_version(stub, "housing", "rf").number
    model_of[first] = "rf"
    _api.deploy(stub, "housing", first, replicas=2)
    addresses = _api.endpoints(stub, "housing")
    assert len(addresses) == 2

    body = _api.ipc_stream(_api.tensor_table(x))
    stop = threading.Event()
    served: list[Served] = []
    errors: list[str] = []
    clients = [
        threading.Thread(target=_load, args=(addresses, body, stop, served, errors))
        for _ in range(CLIENTS)
    ]
    for t in clients:
        t.start()
    # (deploy started, deploy returned, version) for each swap.
    swaps: list[tuple[float, float, int]] = []
    try:
        for i in range(SWAPS):
            model = MODELS[(i + 1) % len(MODELS)]
            number = _api.new_version(stub, "housing", model).number
            model_of[number] = model
            begun = time.monotonic()
            _api.deploy(stub, "housing", number)
            swaps.append((begun, time.monotonic(), number))
            _wait_served(served, number, PER_VERSION)
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=30)

    assert errors == []
    assert len(served) >= SWAPS * PER_VERSION
    for s in served:
        # Each answer is wholly one version: its claimed model, its values, nothing mixed.
        assert s.models == (model_of[s.version],)
        assert s.values == expected[model_of[s.version]]
    for (_, returned, number), nxt in zip(swaps, [*swaps[1:], None], strict=True):
        after = [s for s in served if s.started > returned]
        assert all(s.version >= number for s in after), "served an older version than deployed"
        if nxt is not None:
            # Requests that finished before the next deploy began saw exactly this version.
            between = [s for s in after if s.finished < nxt[0]]
            assert {s.version for s in between} <= {number}
    assert {s.version for s in served} == set(model_of)
