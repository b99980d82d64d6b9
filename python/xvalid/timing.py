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

    @classmethod
    def from_samples(cls, samples_ms: list[float], warmup: int) -> "Timing":
        return cls(statistics.median(samples_ms), min(samples_ms), max(samples_ms),
                   len(samples_ms), warmup)


def time_call(fn: Callable[[], object], warmup: int, repeat: int) -> Timing:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(max(repeat, 1)):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return Timing.from_samples(samples, warmup)
