"""Outputs that are sequences of class distributions, scored frame by frame.

A CTC text recognizer writes [batch, frames, classes] softmax probabilities; the string it
reads is the greedy decode of each frame's most likely class. The SQNR of that tensor
says little about the string: a probability near 1 that drops to 0.9 is most of its
noise and changes no frame's class, and on a recognizer with 6,625 classes and 40
frames a line, activation tensors that each raised the single pass's output by 2 to 4 dB
alone did not move its SQNR, while 93.8% of the frames agreed with the float model and
28.6% of the strings. So such an output is scored as a classifier's is, by top-1
agreement, one row a frame, and a sequence counts as kept when every frame of it agrees:
what the decoded string needs.
"""

from __future__ import annotations

import numpy as np

TOLERANCE = 1e-3
"""How far a row's sum of probabilities (or of exponentiated log-probabilities) may be
from 1 in float32: a softmax over 6,625 classes sums to 1 within about 1e-6."""


def is_distribution_sequence(array: np.ndarray) -> bool:
    """Whether `array` is a sequence of class distributions: [batch, frames, classes].

    Rank 3, float, 2 or more classes on the last axis, every row a distribution:
    non-negative and summing to 1 (softmax), or at most 0 with its exponentials summing
    to 1 (log-softmax). Raw logits are not taken: a recurrent state ([layers, batch,
    hidden], a voice detector's LSTM state) has the same rank and width and is not a
    sequence of classes; its SQNR is its score.
    """
    array = np.asarray(array)
    return array.ndim == 3 and are_distributions(array)


def are_distributions(array: np.ndarray) -> bool:
    """Whether every row over the last axis of `array` is a distribution.

    Float, 2 or more classes, every row non-negative and summing to 1, or at most 0 with
    its exponentials summing to 1.
    """
    array = np.asarray(array)
    if array.ndim < 1 or array.shape[-1] < 2 or array.size == 0:
        return False
    if not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array)):
        return False
    rows = array.reshape(-1, array.shape[-1]).astype(np.float64)
    if rows.min() >= -TOLERANCE:
        return bool(np.all(np.abs(rows.sum(-1) - 1.0) <= TOLERANCE))
    if rows.max() <= TOLERANCE:
        return bool(np.all(np.abs(np.exp(rows).sum(-1) - 1.0) <= TOLERANCE))
    return False


def frames_disagreeing(reference: np.ndarray, candidate: np.ndarray) -> tuple[int, int]:
    """(frames whose most likely class differs, frames) of two same-shaped sequences."""
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    classes = reference.shape[-1]
    ref_top = reference.reshape(-1, classes).argmax(-1)
    cand_top = np.asarray(candidate).reshape(-1, classes).argmax(-1)
    return int(np.count_nonzero(ref_top != cand_top)), int(ref_top.size)
