"""A small HDR-style latency histogram: log-bucketed, sparse, mergeable across processes.

Values are integer microseconds. Below 256 µs every value has its own bucket; above, each
power of two is split into 128 linear sub-buckets, so a bucket is at most 1/128 (0.8%) of its
value wide. Memory grows with the number of distinct buckets hit (a few hundred), never with
the number of samples, and two histograms merge by adding counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

SUB_BITS = 7
SUB = 1 << SUB_BITS  # linear sub-buckets per power of two
EXACT = 2 * SUB  # values below this are exact


def bucket_of(value: int) -> int:
    if value < EXACT:
        return max(value, 0)
    shift = value.bit_length() - SUB_BITS - 1
    return EXACT + (shift - 1) * SUB + (value >> shift) - SUB


def bucket_bounds(index: int) -> tuple[int, int]:
    """[low, high) of the values that land in bucket `index`."""
    if index < EXACT:
        return index, index + 1
    shift = (index - EXACT) // SUB + 1
    top = (index - EXACT) % SUB + SUB
    return top << shift, (top + 1) << shift


class Histogram:
    __slots__ = ("counts", "max", "min", "sum", "total")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0
        self.sum = 0
        self.max = 0
        self.min = 0

    def record(self, value: int) -> None:
        index = bucket_of(value)
        self.counts[index] = self.counts.get(index, 0) + 1
        if self.total == 0 or value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        self.total += 1
        self.sum += value

    def merge(self, other: Histogram) -> Histogram:
        for index, n in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + n
        if other.total:
            self.min = other.min if self.total == 0 else min(self.min, other.min)
            self.max = max(self.max, other.max)
        self.total += other.total
        self.sum += other.sum
        return self

    def percentile(self, q: float) -> float:
        """The value at quantile `q` (0 to 100), within one bucket's width; 0 when empty."""
        if self.total == 0:
            return 0.0
        if q >= 100:
            return float(self.max)
        # ceil(total * q / 100), nudged so float error can't push it one sample too far.
        rank = max(1, math.ceil(self.total * q / 100 - 1e-9))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                low, high = bucket_bounds(index)
                middle = low if high - low == 1 else (low + high - 1) / 2
                return float(min(max(middle, self.min), self.max))
        return float(self.max)

    def mean(self) -> float:
        return self.sum / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, object]:
        # JSON object keys must be strings; the bucket scheme is fixed, so indexes suffice.
        return {
            "sub_bits": SUB_BITS,
            "total": self.total,
            "sum": self.sum,
            "min": self.min,
            "max": self.max,
            "counts": {str(k): v for k, v in sorted(self.counts.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Histogram:
        made = cls()
        counts = data["counts"]
        assert isinstance(counts, Mapping)
        made.counts = {int(k): int(v) for k, v in counts.items()}
        made.total = int(str(data["total"]))
        made.sum = int(str(data["sum"]))
        made.min = int(str(data["min"]))
        made.max = int(str(data["max"]))
        return made

    @classmethod
    def merged(cls, parts: Iterable[Histogram]) -> Histogram:
        out = cls()
        for part in parts:
            out.merge(part)
        return out
