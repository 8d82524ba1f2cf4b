"""The range of a tensor that only a SiLU reads: its negative tail, cut where SiLU is flat.

SiLU(x) = x * sigmoid(x) is exported as Sigmoid(x) and Mul(x, Sigmoid(x)). Every
negative x gives a value in [-0.28, 0], and below -6 within 0.02 of zero. A
batch-normalised Conv in front of it writes a range about as wide on the negative side as
on the positive one (a 320x320 SiLU detector's second Conv: [-201, 206]), so half of
the uint8 grid, or more, holds values the SiLU maps to almost the same output, and the
step on the positive side, where SiLU is nearly the identity, is twice what it needs be.

The range keeps its top and may start at -T instead. What matters is the error of SiLU's
output, not of its input, and the calibration histogram (bin counts n at centres c) gives
it for each candidate T, with s the grid's step on [-T, max]:

    error(T) = sum over c < -T of n * (SiLU(c) - SiLU(-T))**2        (cut)
             + sum over c >= -T of n * (SiLU'(c) * s)**2 / 12          (rounding)

A value deep in the tail costs nothing to round (SiLU' is about 0 there) but SiLU(-T) -
SiLU(c) once cut, so a tensor that lives mostly in the tail keeps the part of it where
SiLU still bends (to -7.6 of -71 in the test); one whose weight is on the positive side
trades more of it for a finer step. T never goes past SiLU's
minimum (x = -1.28): above it SiLU rises again, and values there must read apart. No
cut at all (the calibrated range) is a candidate too, and wins ties.

Measured on that detector (its 57 SiLUs, `quantize --recipe fast`, 64 eval photos): the
rule as written takes its boxes from 29.2 to 30.0 dB and its class logits (less their
mean) from 12.5 to 12.8 dB; its class probabilities read 9.0 dB either way. A rule on the
range alone (cut where SiLU moves by at most half a step) read 10.3 dB of class
probabilities and 13.4 dB of logits there, but cost a Conv -> SiLU -> Conv whose input
lives in the tail 6.7 dB, where the histogram's error gains 1.5 dB
(`tests/test_silu_range.py`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qconvert.calibration import TensorRange
from qconvert.calibration.observers import TensorObserver

SILU_MINIMUM_AT = -1.2784645
"""Where SiLU is least (SiLU'(x) = 0): the highest a cut may start."""
_CUTS = 256
"""Candidate cuts tried between the calibrated minimum and SiLU's minimum."""


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _silu_slope(x: np.ndarray) -> np.ndarray:
    sigmoid = 1.0 / (1.0 + np.exp(-x))
    return sigmoid * (1.0 + x * (1.0 - sigmoid))


def silu_input(value: ir.Value) -> bool:
    """Whether SiLU is all that reads `value`: Sigmoid(x), and Mul(x, that Sigmoid)."""
    readers = value.consumers()
    if len(readers) != 2 or value.is_graph_output():
        return False
    sigmoid = next((node for node in readers if node.op_type == "Sigmoid"), None)
    mul = next((node for node in readers if node.op_type == "Mul"), None)
    if sigmoid is None or mul is None or len(mul.inputs) != 2:
        return False
    return set(mul.inputs) == {value, sigmoid.outputs[0]}


def silu_input_range(
    seen: TensorRange, histogram: TensorObserver, levels: int, *, symmetric: bool
) -> TensorRange:
    """`seen`, or `seen` with its tail cut where that lowers SiLU's error (module doc).

    Args:
        seen: the range the method derived for SiLU's input.
        histogram: the input's calibration statistics.
        levels: the integer grid's steps (255 for uint8).
        symmetric: the grid is symmetric about zero (its step is then 2 max|x| / levels).
    """
    if seen.max <= 0.0 or seen.min >= SILU_MINIMUM_AT or histogram.bins.sum() == 0:
        return seen
    counts = histogram.bins.astype(np.float64)
    centres = (histogram.first_bin + np.arange(counts.size) + 0.5) * histogram.width
    centres = np.clip(centres, seen.min, seen.max)  # what the quantizer reads them as
    values, slopes = _silu(centres), _silu_slope(centres) ** 2
    cuts = np.concatenate(([seen.min], np.linspace(seen.min, SILU_MINIMUM_AT, _CUTS)[1:]))
    # Bins below each cut: prefix sums of n, n SiLU(c), n SiLU(c)^2 give the cut error as
    # sum n (SiLU(c) - SiLU(-T))^2 = A - 2 SiLU(-T) B + SiLU(-T)^2 N, for every cut at once.
    below = np.searchsorted(centres, cuts, side="left")
    prefix = [
        np.concatenate(([0.0], np.cumsum(part)))
        for part in (counts, counts * values, counts * values**2, counts * slopes)
    ]
    count, first, second, slope = (p[below] for p in prefix)
    at_cut = _silu(cuts)
    cut_error = second - 2.0 * at_cut * first + at_cut**2 * count
    if symmetric:
        steps = 2.0 * np.maximum(-cuts, seen.max) / levels
    else:
        steps = (seen.max - cuts) / levels
    rounding = (prefix[3][-1] - slope) * steps**2 / 12.0
    error = np.maximum(cut_error, 0.0) + rounding
    best = int(np.argmin(error))  # the first of equals: the calibrated range wins ties
    return TensorRange(min=float(cuts[best]), max=seen.max) if best else seen
