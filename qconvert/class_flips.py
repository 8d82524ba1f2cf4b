"""How many of a classifier's rows a converted model is expected to flip, from their margins.

A row flips when the conversion's error on its float margin (the top class's score less
another class's) is larger than the margin. With the error normal of rms sigma, row i
flips with

    P(flip_i) = min(1, sum over classes k other than its top class t of Phi(-m_ik / sigma)),
    m_ik      = s_it - s_ik,

where s are the float model's log-scores (logits; a Softmax's log-probabilities, whose
differences are the logits' differences), and sigma is the rms, over the rows, of the
error on the margin between each row's two best classes, the candidate's less the float
model's. The sum over the rows is the flips expected; their mean, the flip rate. For two
classes the sum has one term; for many, near-ties with several classes add up (a bound,
capped at 1).

Counting the rows that did flip estimates the same rate, but in steps of one row (6
points on 16 rows): the expected count is its mean given the margins, so it resolves
what the count cannot. A classifier whose rows lie far from a tie keeps its top-1 class
at a low SQNR (a 1000-class CNN at 20 dB: no margin under 1, 0.28 rms of error, 1e-6
flips expected on 16 rows), and one with rows near a tie loses them at a high one (a
two-class classifier of text crops at 26 dB: 11 of 64 eval rows within 0.37 of a tie,
error 0.28 rms, 2.4 flips expected and 3 flipped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qconvert.class_shift import log_scores

_FAR = 8.0
"""Margins beyond this many sigma flip with a chance under 1e-15: not summed."""


@dataclass(frozen=True, slots=True)
class ExpectedFlips:
    """The flips a candidate's error is expected to make on a classifier's rows.

    Attributes:
        flips: the expected count over the rows.
        rows: the rows it was measured on.
        sigma: the rms error on the top-two margin, in log-score units.
    """

    flips: float
    rows: int
    sigma: float

    @property
    def rate(self) -> float:
        """The share of rows expected to flip."""
        return self.flips / self.rows if self.rows else 0.0


def expected_flips(reference: np.ndarray, candidate: np.ndarray) -> ExpectedFlips | None:
    """The flips `candidate` is expected to make against `reference` (module docstring).

    Both are [rows, classes]: probabilities (every reference row non-negative and
    summing to 1) or logits. None with no rows, fewer than 2 classes or non-finite scores.
    """
    scores = log_scores(reference, candidate)
    if scores is None:
        return None
    ref, cand = scores
    rows = ref.shape[0]
    if rows == 0 or ref.shape[1] < 2:
        return None
    order = np.argsort(-ref, axis=1, kind="stable")
    top, second = order[:, 0], order[:, 1]
    index = np.arange(rows)
    error = (cand[index, top] - cand[index, second]) - (ref[index, top] - ref[index, second])
    if not np.all(np.isfinite(error)) or not np.all(np.isfinite(ref)):
        return None
    sigma = math.sqrt(float(np.mean(error**2)))
    if sigma == 0.0:
        return ExpectedFlips(flips=0.0, rows=rows, sigma=0.0)
    margins = ref[index, top][:, None] - ref
    margins[index, top] = np.inf
    near = margins < _FAR * sigma
    chance = np.zeros_like(margins)
    # Phi(-x) = erfc(x / sqrt 2) / 2
    chance[near] = [0.5 * math.erfc(m / (sigma * math.sqrt(2.0))) for m in margins[near]]
    flips = float(np.minimum(chance.sum(axis=1), 1.0).sum())
    return ExpectedFlips(flips=flips, rows=rows, sigma=sigma)
