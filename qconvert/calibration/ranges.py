"""Range methods: from a tensor's statistics to the range [min, max] it is quantized to.

The statistics (`observers.TensorObserver`) are method-agnostic, so one calibration serves
every method. The histogram methods pick a clipping threshold T on the histogram of |x|
(bin k holds |x| in [k w, (k+1) w]) and the range is [max(min, -T), min(max, T)]:

- `minmax`: the observed [min, max]; no clipping.
- `percentile`: T is the upper edge of the first |x| bin where the cumulative share of
  values reaches p % (TensorRT's and onnxruntime's symmetric percentile).
- `entropy`: TensorRT's KL-divergence calibration. For each candidate of i kept bins
  (i >= L levels): P = the first i bins with every larger value added to the last;
  Q = the first i bins merged into L levels (level j holds the bins k with
  floor(k L / i) = j) and spread back evenly over the bins where P is nonzero. T = i w for
  the i that minimises KL(P || Q); where Q's last level is empty but P's last bin holds the
  outliers, that bin of Q is smoothed to a count of 1e-4, as onnxruntime does; bin 0 (the
  exact zeros of Relu outputs) is levelled to bin 1's count, as NVIDIA's
  pytorch-quantization does, or its spike would always pick the narrowest range.
  L = 2**(bits-1) (128 for 8 bits), or 2**bits when the
  tensor never changes sign (its values all use one side of the integer range).
- `auto`: per tensor, whichever of the four above gives the least expected quantization
  error of the tensor's histogram (`calibration.auto`).
- `mse`: T minimises the expected squared error of quantizing the histogram: values up to T
  round with error step**2 / 12, values above are clipped to T, with step = T / (2**bits - 1)
  for one-signed tensors and 2 T / (2**bits - 1) otherwise.

KL divergence of many candidates at once: with prefix sums over the bins of b, b log b and
[b > 0], each level's total and nonzero count are two lookups, so the cost is
O(candidates x L) array arithmetic, no Python loop per candidate. Not every candidate is
evaluated: a coarse-to-fine search (`least_divergence`) evaluates about 130 of the
1000-4000, and finds the exhaustive minimum on smooth histograms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from qconvert.calibration.observers import MAX_BINS, TensorObserver, TensorRange
from qconvert.errors import ConfigError

METHODS = ("auto", "minmax", "percentile", "entropy", "mse")
_EPS = 1e-4  # the count an empty bin of Q is smoothed to (onnxruntime's smooth_distribution)
# The entropy search (`least_divergence`): candidates of its first pass, minima it follows,
# and the factor between the strides of its successive passes.
_COARSE = 32
_MINIMA = 4
_REFINE = 8
# Candidates x levels tables are built in chunks of at most this many elements: larger
# temporaries are fresh memory from the system on every call, and their page faults
# cost more than the arithmetic.
_TABLE_ELEMENTS = 16384


@dataclass(frozen=True, slots=True, kw_only=True)
class RangeMethod:
    """How ranges are derived from statistics.

    Attributes:
        name: one of `METHODS`.
        percentile: the share of |x| kept by `percentile`, in percent.
        bits: integer bits of the quantized activations (entropy levels, mse step).
    """

    name: str = "minmax"
    percentile: float = 99.99
    bits: int = 8

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ConfigError(
                f"Unknown calibration method '{self.name}'.",
                hint=f"choose from {', '.join(METHODS)}.",
            )
        if not 0.0 < self.percentile <= 100.0:
            raise ConfigError(
                f"Percentile {self.percentile} is out of range; it must be in (0, 100]."
            )
        if not 2 <= self.bits <= 32:
            raise ConfigError(f"Quantized bits {self.bits} must be in [2, 32].")


def derive_ranges(
    observers: Mapping[str, TensorObserver], method: RangeMethod
) -> Mapping[str, TensorRange]:
    """The range of every observed tensor under `method`."""
    return MappingProxyType({name: tensor_range(o, method) for name, o in observers.items()})


def tensor_range(
    observer: TensorObserver, method: RangeMethod, counts: np.ndarray | None = None
) -> TensorRange:
    """The range of one tensor under `method`.

    `counts` is the observer's `abs_histogram` where the caller has it: `auto` tries
    three histogram methods on one tensor, and folding a histogram of thousands of bins
    once instead of three times was a third of its ranges stage.
    """
    if method.name == "auto":
        from qconvert.calibration.auto import choose_range  # auto builds on this module

        return choose_range(observer, method).range
    observed = observer.finalize()
    if method.name == "minmax" or observer.count == 0:
        return observed
    counts = abs_histogram(observer) if counts is None else counts
    amax = max(-observed.min, observed.max)
    if counts.sum() == 0 or amax == 0.0:
        return observed
    one_signed = observed.min >= 0.0 or observed.max <= 0.0
    if method.name == "percentile":
        kept_bins = percentile_bins(counts, method.percentile)
    elif method.name == "entropy":
        levels = 2 ** (method.bits if one_signed else method.bits - 1)
        # A tensor far from 0 (all values in [1000, 1001]) folds into millions of |x| bins,
        # and the divergence of every candidate would take candidates x levels memory:
        # merge bins first, as coarse as the candidates need, at most MAX_BINS of them.
        factor = max(1, math.ceil(counts.size / MAX_BINS))
        if factor > 1:
            padded = np.pad(counts, (0, -counts.size % factor))
            kept_bins = entropy_bins(padded.reshape(-1, factor).sum(axis=1), levels) * factor
        else:
            kept_bins = entropy_bins(counts, levels)
    else:
        steps = (2**method.bits - 1) / (1.0 if one_signed else 2.0)
        kept_bins = mse_bins(counts, steps)
    threshold = min(kept_bins * observer.width, amax)
    if one_signed:  # a threshold below the smallest |x| would clip everything
        threshold = max(threshold, min(abs(observed.min), abs(observed.max)))
    return TensorRange(max(observed.min, -threshold), min(observed.max, threshold))


def abs_histogram(observer: TensorObserver) -> np.ndarray:
    """Counts of |x| per bin of the observer's width: bin k holds |x| in [k w, (k+1) w].

    Signed bin k >= 0 holds x in [k w, (k+1) w); signed bin -k-1 holds x in [-(k+1) w, -k w).
    """
    indices = observer.first_bin + np.arange(observer.bins.size)
    folded = np.where(indices >= 0, indices, -indices - 1)
    size = int(folded.max()) + 1 if folded.size else 0
    return np.bincount(folded, weights=observer.bins, minlength=size)


def percentile_bins(counts: np.ndarray, percentile: float) -> int:
    """The number of leading bins that hold `percentile` % of the values."""
    cumulative = np.cumsum(counts)
    target = cumulative[-1] * percentile / 100.0
    return int(np.searchsorted(cumulative, target * (1 - 1e-12), side="left")) + 1


def entropy_bins(counts: np.ndarray, levels: int) -> int:
    """The number of leading bins kept by TensorRT's KL-divergence criterion."""
    size = counts.size
    if size <= levels:
        return size
    if not np.any(counts[1:]):  # every value was in bin 0: no distribution left to compare
        return size
    kept, divergence = least_divergence(entropy_divergence(counts, levels), levels, size)
    return kept if divergence < math.inf else size


def least_divergence(
    divergence: Callable[[np.ndarray], np.ndarray], low: int, high: int
) -> tuple[int, float]:
    """The candidate in [low, high] of least divergence (found coarse to fine), and its value.

    First every stride-th candidate (about `_COARSE` of them, and `high`); then, around
    each of the `_MINIMA` best candidates so far that lie a stride apart, those within a
    stride at a stride `_REFINE` times finer; and so on down to a stride of 1. The
    divergence is jagged from one candidate to the next (level edges cross bins), so
    several minima are followed, not the best one alone.
    """
    stride = 1 << max(0, ((high - low) // _COARSE).bit_length() - 1)
    tried = np.append(np.arange(low, high, stride), high)
    values = divergence(tried)
    while stride > 1:
        finer = max(1, stride // _REFINE)
        centres = _distinct_minima(tried, values, stride)
        around = (centres[:, None] + np.arange(finer - stride, stride, finer)).ravel()
        fresh = np.zeros(high + 1, dtype=bool)
        fresh[around[(around >= low) & (around <= high)]] = True
        fresh[tried] = False
        candidates = np.flatnonzero(fresh)
        tried = np.concatenate((tried, candidates))
        values = np.concatenate((values, divergence(candidates)))
        stride = finer
    best = int(np.argmin(values))
    return int(tried[best]), float(values[best])


def _distinct_minima(tried: np.ndarray, values: np.ndarray, apart: int) -> np.ndarray:
    """Up to `_MINIMA` candidates of least value, each at least `apart` from the others.

    Minima above twice the least (a divergence is >= 0) are left out: refining around them
    found nothing better on the test histograms and the sample models' tensors, and
    skipping them saves an eighth of the candidates evaluated.
    """
    chosen: list[int] = []
    candidates = tried.tolist()
    order = np.argsort(values, kind="stable").tolist()
    least = float(values[order[0]])
    bound = least + abs(least) if least > -math.inf else least
    for index in order:
        if values[index] > bound:
            break
        candidate = candidates[index]
        if all(abs(candidate - other) >= apart for other in chosen):
            chosen.append(candidate)
            if len(chosen) == _MINIMA:
                break
    return np.array(chosen, dtype=np.intp)


def entropy_divergence(counts: np.ndarray, levels: int) -> Callable[[np.ndarray], np.ndarray]:
    """KL(P || Q) of TensorRT's calibration, as a function of candidates i kept bins.

    The prefix sums are built once; the returned function takes an array of candidates
    (each in [levels, counts.size]) and returns their divergences (+inf where the kept
    bins hold no value). `counts` needs a value outside bin 0.
    """
    bins = np.array(counts, dtype=np.float64)
    size = bins.size
    # The exact zeros of Relu outputs pile up in bin 0; that spike would dominate the
    # divergence and always pick the narrowest range. NVIDIA's pytorch-quantization levels
    # it to its neighbour, and so do we.
    bins[0] = bins[1]
    total = float(bins.sum())
    # Below, x log x is taken as x log(x + tiny): 0 at x = 0, without a mask.
    tiny = np.finfo(np.float64).tiny
    # Prefix sums, with a leading 0, over the bins of b, b log b and [b > 0].
    sums = np.zeros(size + 1)
    np.cumsum(bins, out=sums[1:])
    sums_log = np.zeros(size + 1)
    np.cumsum(bins * np.log(bins + tiny), out=sums_log[1:])
    nonzero = np.zeros(size + 1, dtype=np.intp)
    np.cumsum(bins > 0, out=nonzero[1:])
    # A candidate that keeps no value clips every value to its edge: never a choice. (As
    # log 0 = -inf it would score -inf and win, collapsing a tensor that lives away from
    # zero, say in +-[3, 4], to a few bins.)
    with np.errstate(divide="ignore"):
        log_kept = np.where(sums > 0, np.log(sums / total), math.inf)
    # A level spans at most ceil(size / L) bins: the logs of its count of nonzero bins
    # (plus one, for the last level) come from a table that long. log 0 is taken as 0.
    log_count = np.log(np.maximum(np.arange(size // levels + 3, dtype=np.float64), 1.0))
    level = np.arange(levels + 1, dtype=np.intp)  # intp: take() casts no index
    shift = int(levels).bit_length() - 1 if levels & (levels - 1) == 0 else None
    # Sums a row of the table over every level but the last (and the garbage column).
    inner_levels = np.append(np.ones(levels - 1), [0.0, 0.0])

    def divergence(kept: np.ndarray) -> np.ndarray:
        kept = np.asarray(kept, dtype=np.intp)
        if kept.size == 0:
            return np.empty(0)
        chunk = max(1, _TABLE_ELEMENTS // (levels + 1))
        if kept.size > chunk:
            return np.concatenate(
                [divergence(kept[at : at + chunk]) for at in range(0, kept.size, chunk)]
            )
        # edges[i, j] = ceil(j i / L), flat: row i holds the L + 1 edges of candidate i.
        edges = np.multiply.outer(kept, level).ravel()
        edges += levels - 1
        if shift is not None:  # L is a power of two, as 2**bits is: a shift divides
            edges >>= shift
        else:
            edges //= levels
        # Per level, sum and count of nonzero bins: one gather per prefix table, then
        # differences of neighbours along the flat table (far faster than along rows of
        # a 2-D one). Column L of each row is then the difference across two rows:
        # garbage, zeroed (its count is clipped to 0 in the log table) and never summed.
        level_sum = _neighbour_differences(sums.take(edges))
        level_sum[levels :: levels + 1] = 0.0
        level_nonzero = _neighbour_differences(nonzero.take(edges))
        # Every level but the last: P and Q hold the same mass s over n nonzero bins, and
        # the cross term is s (log n - log s); 0 for an empty level (s = n = 0).
        terms = log_count.take(level_nonzero, mode="clip")
        terms -= np.log(level_sum + tiny)
        terms *= level_sum
        cross = terms.reshape(-1, levels + 1) @ inner_levels

        # The last level, one value per candidate. P's last bin takes the outliers.
        outliers = total - sums[kept]
        last_bin = bins[kept - 1]
        q_last = level_sum[levels - 1 :: levels + 1]
        p_last = q_last + outliers
        # If P's last bin was empty, it becomes a nonzero bin of Q's last level, which
        # then must hold some count or Q misses mass that P has: where that level is
        # empty, like onnxruntime, smooth it to a count of eps (its one nonzero bin, the
        # last, has log 1 = 0) instead of making the divergence infinite.
        n_last = level_nonzero[levels - 1 :: levels + 1]
        n_last += (last_bin == 0) & (outliers > 0)
        cross += p_last * (log_count[n_last] - np.log(np.where(q_last > 0, q_last, _EPS)))
        # sum of P log P over the bins: the kept ones, the last with the outliers added.
        p_bin = last_bin + outliers
        p_log_p = sums_log[kept - 1] + p_bin * np.log(p_bin + tiny)
        # KL of P and Q normalised: P sums to the total, Q to the kept values.
        return (p_log_p + cross) / total + log_kept[kept]

    return divergence


def _neighbour_differences(values: np.ndarray) -> np.ndarray:
    """values[k + 1] - values[k] at k, with a 0 in the last place to keep the size."""
    differences = np.empty_like(values)
    np.subtract(values[1:], values[:-1], out=differences[:-1])
    differences[-1] = 0
    return differences


def mse_bins(counts: np.ndarray, steps: float) -> int:
    """The number of leading bins whose upper edge, as clip threshold, minimises the MSE.

    In bin units (the width cancels out of the argmin): threshold t = i, step = t / steps,
    error(t) = n(<= t) step**2 / 12 + sum over bins above t of n (center - t)**2.
    """
    bins = np.asarray(counts, dtype=np.float64)
    centers = np.arange(bins.size) + 0.5
    # Suffix sums over bins k >= i of n, n c, n c**2.
    n_above = np.cumsum(bins[::-1])[::-1]
    c_above = np.cumsum((bins * centers)[::-1])[::-1]
    c2_above = np.cumsum((bins * centers**2)[::-1])[::-1]
    thresholds = np.arange(1, bins.size + 1, dtype=np.float64)
    above_n = np.append(n_above[1:], 0.0)
    above_c = np.append(c_above[1:], 0.0)
    above_c2 = np.append(c2_above[1:], 0.0)
    clipped = above_c2 - 2 * thresholds * above_c + thresholds**2 * above_n
    rounding = (bins.sum() - above_n) * (thresholds / steps) ** 2 / 12.0
    return int(thresholds[np.argmin(clipped + rounding)])
