"""Observers: streaming, mergeable statistics of one tensor."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class TensorRange:
    """The real range [min, max] a tensor is quantized to."""

    min: float
    max: float


class MinMaxObserver:
    """Running minimum and maximum of every value seen."""

    def __init__(self) -> None:
        self.min = float("inf")
        self.max = float("-inf")
        self.count = 0

    def update(self, values: np.ndarray) -> None:
        """Folds one batch of values into the statistics."""
        if values.size == 0:
            return
        self.min = min(self.min, float(values.min()))
        self.max = max(self.max, float(values.max()))
        self.count += int(values.size)

    def merge(self, other: MinMaxObserver) -> None:
        """Folds another observer's statistics in: the result equals one pass over both."""
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count += other.count

    def finalize(self) -> TensorRange:
        """The observed range; a tensor never seen (or empty) gets [0, 0]."""
        if self.count == 0:
            return TensorRange(0.0, 0.0)
        return TensorRange(self.min, self.max)
