"""Observers: streaming, exactly mergeable statistics of one tensor.

Per tensor we keep the minimum, the maximum, the number of values, and a histogram whose
bins are fixed-width and anchored at 0 with a power-of-two width w = 2**e:

    bin(x) = floor(x / w)                     (x / w is exact in floating point)

Bins are stored densely from `first_bin` to the bin of the maximum. The width is always the
*smallest* power of two at which [min, max] spans at most `MAX_BINS` bins. Doubling the
width maps bin k to bin floor(k / 2) exactly, because floor(floor(x / w) / 2) =
floor(x / 2w). So when the range grows, the histogram is re-binned without loss, and two
histograms of different widths merge exactly by re-binning the finer one. As the width is a
function of [min, max] alone, streaming a data set in any order, or in parts that are then
merged, gives bit-identical statistics: the base for calibrating across processes.

Memory per tensor is bounded by `MAX_BINS` counters, whatever the number of samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_BINS = 4096
"""Bins over [min, max]: the |x| histogram the range methods read then has 1024 to 4096."""

_MIN_EXPONENT = -60
_MAX_INDEX = 1 << 24  # bin indices stay exact in float32 arithmetic


class NonFiniteError(ValueError):
    """A tensor took NaN values: the model is broken on this data."""


@dataclass(frozen=True, slots=True)
class TensorRange:
    """The real range [min, max] a tensor is quantized to."""

    min: float
    max: float


def bin_exponent(low: float, high: float) -> int:
    """The smallest e >= -60 at which [low, high] spans at most MAX_BINS bins of width 2**e.

    The span shrinks as e grows, so this is a function of the range alone: the key to
    exact merging.
    """
    # A lower bound to start from, monotone in the range like the answer itself.
    exponent = _MIN_EXPONENT
    if high > low:
        exponent = max(exponent, math.frexp((high - low) / MAX_BINS)[1] - 2)
    magnitude = max(abs(low), abs(high))
    if magnitude > 0.0:
        exponent = max(exponent, math.frexp(magnitude / _MAX_INDEX)[1] - 1)
    while not _fits(low, high, exponent):
        exponent += 1
    return exponent


def histogram_layout(low: float, high: float) -> tuple[int, int, int]:
    """(bin exponent, first bin, number of bins) of the histogram of [low, high]."""
    exponent = bin_exponent(low, high)
    first = math.floor(math.ldexp(low, -exponent))
    return exponent, first, math.floor(math.ldexp(high, -exponent)) - first + 1


def _fits(low: float, high: float, exponent: int) -> bool:
    first = math.floor(math.ldexp(low, -exponent))
    last = math.floor(math.ldexp(high, -exponent))
    return last - first + 1 <= MAX_BINS and max(abs(first), abs(last)) < _MAX_INDEX


class TensorObserver:
    """Running min, max, value count and re-binnable histogram of one tensor.

    `update` takes every value of a batch for min/max/count and, optionally, a subset of them
    for the histogram (the collector histograms a deterministic stride of large tensors to
    keep calibration as fast as a float pass). With no subset, all values are histogrammed.
    """

    __slots__ = ("bins", "count", "exponent", "first_bin", "max", "min")

    def __init__(self) -> None:
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.exponent = _MIN_EXPONENT
        self.first_bin = 0
        self.bins = np.zeros(0, dtype=np.int64)

    @property
    def width(self) -> float:
        """The width of one histogram bin."""
        return math.ldexp(1.0, self.exponent)

    @property
    def histogram_count(self) -> int:
        """How many values the histogram holds."""
        return int(self.bins.sum())

    def update(self, values: np.ndarray, histogram_values: np.ndarray | None = None) -> None:
        """Folds one batch of values into the statistics."""
        if values.size == 0:
            return
        if values.dtype != np.float32:
            values = values.astype(np.float32)
            if histogram_values is not None:
                histogram_values = histogram_values.astype(np.float32)
        low, high = float(values.min()), float(values.max())
        if not (math.isfinite(low) and math.isfinite(high)):
            # Rare: masks written as -inf, or a model that overflows. Infinite values carry
            # no range information; NaN means the model is broken on this data.
            if np.isnan(low) or np.isnan(high):
                raise NonFiniteError("the tensor holds NaN values")
            finite = np.isfinite(values)
            values = values[finite]
            if histogram_values is not None:
                histogram_values = histogram_values[np.isfinite(histogram_values)]
            if values.size == 0:
                return
            low, high = float(values.min()), float(values.max())
        self._extend(min(self.min, low), max(self.max, high))
        self.count += int(values.size)
        self._histogram(values if histogram_values is None else histogram_values)

    def update_reduced(
        self, low: float, high: float, count: int, histogram_values: np.ndarray
    ) -> None:
        """Folds in a batch already reduced: its finite min, max and value count.

        The same as `update` on the values themselves, for a caller that computed the
        reductions elsewhere (inside the model, `calibration.reducing`) and kept only the
        subset of values the histogram takes.
        """
        if count == 0:
            return
        self._extend(min(self.min, low), max(self.max, high))
        self.count += count
        self._histogram(histogram_values.astype(np.float32, copy=False))

    def _histogram(self, sample: np.ndarray) -> None:
        """Adds `sample` (float32, within [min, max]) to the histogram."""
        if sample.size == 0:
            return
        scaled = np.multiply(
            sample, np.float32(math.ldexp(1.0, -self.exponent)), dtype=np.float32
        )
        np.floor(scaled, out=scaled)
        indices = scaled.astype(np.intp).ravel()
        indices -= self.first_bin
        try:
            counts = np.bincount(indices, minlength=self.bins.size)
        except ValueError:  # a negative index: only odd subnormals can round that way
            counts = np.bincount(np.maximum(indices, 0), minlength=self.bins.size)
        if counts.size > self.bins.size:  # likewise, past the last bin
            counts[self.bins.size - 1] += counts[self.bins.size :].sum()
            counts = counts[: self.bins.size]
        self.bins += counts

    def merge(self, other: TensorObserver) -> None:
        """Folds another observer in: the result equals one pass over both inputs."""
        if other.count == 0:
            return
        self._extend(min(self.min, other.min), max(self.max, other.max))
        self.count += other.count
        bins = _rebinned(other.bins, other.first_bin, other.exponent, self.exponent)
        start = (other.first_bin >> (self.exponent - other.exponent)) - self.first_bin
        self.bins[start : start + bins.size] += bins

    def finalize(self) -> TensorRange:
        """The observed range; a tensor never seen (or empty) gets [0, 0]."""
        if self.count == 0:
            return TensorRange(0.0, 0.0)
        return TensorRange(self.min, self.max)

    def _extend(self, low: float, high: float) -> None:
        """Widens the range to [low, high], re-binning the histogram when it must."""
        if self.count and low >= self.min and high <= self.max:
            return
        exponent, first, size = histogram_layout(low, high)
        if self.count == 0:
            bins = np.zeros(size, dtype=np.int64)
        else:
            rebinned = _rebinned(self.bins, self.first_bin, self.exponent, exponent)
            start = (self.first_bin >> (exponent - self.exponent)) - first
            bins = np.zeros(size, dtype=np.int64)
            bins[start : start + rebinned.size] = rebinned
        self.min, self.max = low, high
        self.exponent, self.first_bin, self.bins = exponent, first, bins

    @classmethod
    def from_state(
        cls,
        *,
        min: float,
        max: float,
        count: int,
        exponent: int,
        first_bin: int,
        bins: np.ndarray,
    ) -> TensorObserver:
        """An observer holding saved statistics (see `calibration.file`)."""
        observer = cls()
        observer.min, observer.max, observer.count = min, max, count
        observer.exponent, observer.first_bin = exponent, first_bin
        observer.bins = np.asarray(bins, dtype=np.int64)
        return observer


def _rebinned(bins: np.ndarray, first: int, exponent: int, new_exponent: int) -> np.ndarray:
    """`bins` (starting at bin `first` of width 2**exponent) at the coarser 2**new_exponent."""
    shift = new_exponent - exponent
    if shift == 0 or bins.size == 0:
        return bins.copy()
    targets = ((first + np.arange(bins.size)) >> shift) - (first >> shift)
    return np.bincount(targets, weights=bins).astype(np.int64)


MinMaxObserver = TensorObserver  # the first API's name; its min and max are the same
