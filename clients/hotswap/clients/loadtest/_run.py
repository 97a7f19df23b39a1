"""Runs one load (with optional swaps and a progress line) and returns the report dict."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

from tqdm import tqdm

from hotswap.clients.loadtest._report import summarise
from hotswap.clients.loadtest._runner import Load, LoadSpec
from hotswap.clients.loadtest._swap import Swapper, SwapPlan


def _progress(
    load: Load, stopped: threading.Event, stream: TextIO, swapper: Swapper | None
) -> None:
    """A tqdm bar over the load's bound (its requests, or else its seconds), with the
    answers, errors, rate and swaps so far; twice a second until the load stops."""
    spec = load.spec
    by_requests = spec.requests is not None
    total = spec.requests if by_requests else spec.duration
    bar = tqdm(total=total, file=stream, unit="req" if by_requests else "s", desc="load")
    last, last_t = 0, time.monotonic()

    def show() -> None:
        nonlocal last, last_t
        done, errors = load.shared.done()
        now = time.monotonic()
        rate = (done - last) / max(now - last_t, 1e-9)
        last, last_t = done, now
        position = done if by_requests else now - load.t0
        bar.update(min(position, total or position) - bar.n)
        swaps = f" swaps={len(swapper.records)}" if swapper else ""
        bar.set_postfix_str(f"ok={done} errors={errors} now={rate:,.0f} req/s{swaps}")

    with bar:
        while not stopped.wait(0.5):
            show()
        show()  # where it ended


def run_load(
    spec: LoadSpec,
    plan: SwapPlan | None = None,
    *,
    window_s: float = 0.25,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Drives `spec` (and swaps per `plan`) until done; always stops by itself."""
    if spec.duration is None and spec.requests is None and not (plan and plan.stop_load_after):
        raise ValueError("bound the load with a duration, a request count or a swap count")
    load = Load(spec)
    load.start_children()
    end = load.t0 + spec.duration if spec.duration is not None else float("inf")
    swapper = Swapper(plan, load.t0, end, load.shared.stop) if plan else None
    if swapper:
        swapper.start()
    show = sys.stderr.isatty() if progress is None else progress
    stopped = threading.Event()
    printer = threading.Thread(
        target=_progress, args=(load, stopped, sys.stderr, swapper), daemon=True
    )
    if show:
        printer.start()
    try:
        result = load.wait()
    finally:
        load.shared.stop.value = 1
        stopped.set()
        if swapper:
            swapper.finished.set()
            swapper.join()
        if show:
            printer.join()
    return summarise(spec, result, swapper.records if swapper else [], window_s)
