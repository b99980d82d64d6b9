"""Wall-clock timing of a call: warmup runs, then `repeat` timed runs; medians are quoted."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    repeat: int
    warmup: int

    def to_json(self) -> dict:
        return asdict(self)


def time_call(fn: Callable[[], object], warmup: int, repeat: int) -> Timing:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(max(repeat, 1)):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return Timing(statistics.median(samples), min(samples), max(samples), len(samples), warmup)
