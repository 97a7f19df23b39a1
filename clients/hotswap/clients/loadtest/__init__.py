"""``hotswap loadtest``: drive a pipeline with load (and swaps) and report what clients saw."""

from hotswap.clients.loadtest.__main__ import main
from hotswap.clients.loadtest._histogram import Histogram
from hotswap.clients.loadtest._run import run_load
from hotswap.clients.loadtest._runner import LoadSpec, Target
from hotswap.clients.loadtest._swap import SwapPlan, endpoints

__all__ = ["Histogram", "LoadSpec", "SwapPlan", "Target", "endpoints", "main", "run_load"]
