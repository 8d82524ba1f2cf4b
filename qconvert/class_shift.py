"""The mean shift a converted classifier's scores take toward some classes over others.

SQNR weighs an error's energy, not its direction. A change that trades noise for a
constant lean toward one class can raise a classifier's held-out SQNR and keep its
held-out top-1 agreement while it costs agreement on data whose class mix differs: a lean
toward class 1 settles the near-even crops of class 1 and flips those of class 0, so a
held-out set that is mostly class 1 cannot see it. On a two-class text-orientation
classifier a raised squeeze-excitation Conv gained 3.1 dB held out and kept 14 of 16
rows, while the class-1 probability rose by 0.0146 on average over its 64 calibration
crops (64% class 1) and top-1 agreement on its eval crops (45% class 1, 11 of 64 within
0.1 of an even split) fell from 63 to 56 of 64 rows.

The shift is measured on the log-scores the decision compares, on the classes the float
model ranks first or second on some row (those the decisions are between; a 1000-class
model's far tail moves its logits without deciding anything): each row's scores less their
mean over those classes (a softmax does not see a constant added to every logit), the
candidate's less the float model's. Their mean over the rows is the shift; its energy
against what noise alone would leave in a mean of as many rows (`ratio`) says whether it
is a lean or noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PROBABILITY_FLOOR = 1e-6
"""Probabilities are read as at least this before their logarithm is taken: a quantized
Softmax writes exact zeros, and no decision tells 1e-6 from 0."""

_SUMS_TO_ONE = 1e-3
"""How far a row's sum may lie from 1 for the rows to be read as probabilities."""


_ROUNDING = 1e-9
"""Errors this small against the largest score are rounding of the centring, not a shift."""


@dataclass(frozen=True, slots=True)
class ClassShift:
    """The mean shift of a classifier's log-scores, candidate against float.

    Attributes:
        energy: the squared length of the mean shift over the rows, in (log-score)^2.
        ratio: that energy times the rows, over the per-row spread of the shift about
            its mean: about 1 when the mean is noise, and for two classes the square of
            the shift's t statistic. 0 when nothing moved.
        rows: the rows it was measured on.
    """

    energy: float
    ratio: float
    rows: int


def log_scores(
    reference: np.ndarray, candidate: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Both [rows, classes] score arrays as the log-scores a decision compares, in float64.

    Logits as they are; probabilities (every reference row non-negative and summing to
    1) as their logarithms. None unless both are [rows, classes] of the same shape.
    """
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.ndim != 2 or ref.shape != cand.shape:
        return None
    if np.all(ref >= 0.0) and np.all(np.abs(ref.sum(axis=1) - 1.0) <= _SUMS_TO_ONE):
        ref = np.log(np.maximum(ref, PROBABILITY_FLOOR))
        cand = np.log(np.maximum(cand, PROBABILITY_FLOOR))
    return ref, cand


def class_shift(reference: np.ndarray, candidate: np.ndarray) -> ClassShift | None:
    """The mean shift of `candidate`'s class scores against `reference`'s.

    Both are [rows, classes]: probabilities (every reference row non-negative and
    summing to 1) or logits. None with fewer than 2 rows or 2 classes.
    """
    scores = log_scores(reference, candidate)
    if scores is None or scores[0].shape[0] < 2 or scores[0].shape[1] < 2:
        return None
    ref, cand = scores
    # The classes the float model ranks first or second on some row.
    ranked = np.argsort(-ref, axis=1, kind="stable")[:, :2]
    classes = np.unique(ranked)
    ref, cand = ref[:, classes], cand[:, classes]
    error = (cand - cand.mean(axis=1, keepdims=True)) - (ref - ref.mean(axis=1, keepdims=True))
    if not np.all(np.isfinite(error)):
        return None
    # Rounding of the centring itself is no shift (a constant added to a row).
    error[np.abs(error) <= _ROUNDING * max(1.0, float(np.abs(ref).max()))] = 0.0
    rows = error.shape[0]
    mean = error.mean(axis=0)
    energy = float(mean @ mean)
    spread = float(np.sum((error - mean) ** 2)) / (rows - 1)
    if energy == 0.0:
        ratio = 0.0
    elif spread == 0.0:
        ratio = float("inf")
    else:
        ratio = rows * energy / spread
    return ClassShift(energy=energy, ratio=ratio, rows=rows)
