"""Metric math for comparing a candidate model's outputs with a reference's.

All metrics are streamed: `OutputAccumulator.update` takes one batch and keeps sums only.

    SQNR (dB)   = 10 log10( sum(ref^2) / sum((ref - cand)^2) )   (inf when identical)
    cosine      = sum(ref * cand) / (|ref| |cand|)                 (over all values)
    top-1 agreement = share of rows whose argmax over the last axis is the same
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class OutputMetrics:
    """How far one output of the candidate is from the reference's."""

    name: str
    sqnr_db: float
    cosine: float
    max_abs_error: float
    mean_abs_error: float
    top1_agreement: float | None


class OutputAccumulator:
    """Streams reference/candidate pairs of one output into sums."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.signal = 0.0
        self.noise = 0.0
        self.dot = 0.0
        self.candidate_energy = 0.0
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.count = 0
        self.rows = 0
        self.rows_agreeing = 0

    def update(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        """Adds one batch of outputs."""
        ref = np.asarray(reference, dtype=np.float64)
        cand = np.asarray(candidate, dtype=np.float64)
        error = ref - cand
        self.signal += float(np.sum(ref * ref))
        self.noise += float(np.sum(error * error))
        self.dot += float(np.sum(ref * cand))
        self.candidate_energy += float(np.sum(cand * cand))
        if error.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(error))))
        self.sum_abs += float(np.sum(np.abs(error)))
        self.count += error.size
        if is_classifier_like(ref):
            self.rows += ref.size // ref.shape[-1]
            self.rows_agreeing += int(np.sum(ref.argmax(-1) == cand.argmax(-1)))

    def result(self) -> OutputMetrics:
        """The metrics over everything seen."""
        return OutputMetrics(
            name=self.name,
            sqnr_db=sqnr_db(self.signal, self.noise),
            cosine=cosine(self.dot, self.signal, self.candidate_energy),
            max_abs_error=self.max_abs,
            mean_abs_error=self.sum_abs / self.count if self.count else 0.0,
            top1_agreement=self.rows_agreeing / self.rows if self.rows else None,
        )


def sqnr_db(signal_energy: float, noise_energy: float) -> float:
    """Signal-to-quantization-noise ratio in dB; inf for no noise."""
    if noise_energy == 0.0:
        return math.inf
    if signal_energy == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_energy / noise_energy)


def cosine(dot: float, energy_a: float, energy_b: float) -> float:
    """Cosine similarity from the dot product and both energies; 1 when both are zero."""
    if energy_a == 0.0 and energy_b == 0.0:
        return 1.0
    if energy_a == 0.0 or energy_b == 0.0:
        return 0.0
    return dot / math.sqrt(energy_a * energy_b)


def is_classifier_like(array: np.ndarray) -> bool:
    """Scores over classes: a float tensor whose last axis has 2 or more entries."""
    return array.ndim >= 2 and array.shape[-1] >= 2 and np.issubdtype(array.dtype, np.floating)
