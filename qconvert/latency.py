"""Latency of one model in onnxruntime: warm-up, then timed runs on a fixed sample.

Each run is timed alone with a monotonic clock. The median is robust to the odd slow run
(a page fault, another process); p90 shows the tail. Warm-up runs come first and are not
timed: the first runs allocate buffers and fill caches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from qconvert.dataset import Feeds
from qconvert.errors import ConfigError


@dataclass(frozen=True, slots=True, kw_only=True)
class LatencyConfig:
    """How latency is measured.

    Attributes:
        runs: timed runs per model (enough for a stable median).
        warmup: untimed runs before them.
        threads: onnxruntime intra-op threads; fixed so runs are comparable.
    """

    runs: int = 50
    warmup: int = 5
    threads: int = 1

    def __post_init__(self) -> None:
        if self.runs < 1:
            raise ConfigError(f"--runs must be at least 1, not {self.runs}.")
        if self.warmup < 0:
            raise ConfigError(f"Warm-up runs must be 0 or more, not {self.warmup}.")
        if self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, not {self.threads}.")


@dataclass(frozen=True, slots=True, kw_only=True)
class Latency:
    """Milliseconds per run of one model."""

    median_ms: float
    p90_ms: float
    runs: int
    threads: int


def measure_latency(session, feeds: Feeds, config: LatencyConfig) -> Latency:
    """Times `session.run` on `feeds` as `config` says."""
    for _ in range(config.warmup):
        session.run(None, feeds)
    timings = np.empty(config.runs)
    for index in range(config.runs):
        start = time.perf_counter()
        session.run(None, feeds)
        timings[index] = time.perf_counter() - start
    return Latency(
        median_ms=float(np.median(timings) * 1e3),
        p90_ms=float(np.percentile(timings, 90) * 1e3),
        runs=config.runs,
        threads=config.threads,
    )
