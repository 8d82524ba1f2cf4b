"""Metric math for comparing a candidate model's outputs with a reference's.

All metrics are streamed: `OutputAccumulator.update` takes one batch and keeps sums only, so
memory does not grow with the number of samples. With r the reference values, c the
candidate's and e = r - c, over every value seen:

    SQNR (dB)          = 10 log10( sum(r^2) / sum(e^2) )        (inf when e is all zero)
    cosine             = sum(r c) / sqrt(sum(r^2) sum(c^2))     (1 when both are all zero)
    max abs error      = max |e|
    mean abs error     = sum |e| / count
    relative error     = sqrt( sum(e^2) / sum(r^2) )            (the L2 error relative to r)

For classifier-like outputs (float, last axis of 2 or more classes), per row over the last
axis:

    top-1 agreement    = share of rows where argmax r == argmax c
    top-5 overlap      = mean over rows of |top5(r) & top5(c)| / 5   (k = classes if fewer)

Non-finite values are counted per model; they make the sums (and so the metrics) NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TOP_K = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputMetrics:
    """How far one output of the candidate is from the reference's."""

    name: str
    sqnr_db: float
    cosine: float
    max_abs_error: float
    mean_abs_error: float
    relative_error: float
    top1_agreement: float | None
    top5_overlap: float | None
    values: int
    nonfinite_reference: int
    nonfinite_candidate: int


class OutputAccumulator:
    """Streams reference/candidate pairs of one output into sums.

    `classify` turns on the classifier metrics (top-1, top-5) for classifier-like outputs;
    intermediate tensors leave it off.
    """

    def __init__(self, name: str, *, classify: bool = True) -> None:
        self.name = name
        self.classify = classify
        self.signal = 0.0
        self.noise = 0.0
        self.dot = 0.0
        self.candidate_energy = 0.0
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.count = 0
        self.rows = 0
        self.rows_agreeing = 0
        self.top_k_hits = 0.0
        self.nonfinite = [0, 0]

    def update(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        """Adds one batch of outputs of the same shape."""
        ref = np.asarray(reference, dtype=np.float64).reshape(-1)
        cand = np.asarray(candidate, dtype=np.float64).reshape(-1)
        error = ref - cand
        abs_error = np.abs(error)
        # einsum, not `@`: a BLAS dot wakes BLAS's own thread pool, which fights
        # onnxruntime's for the cores and made small products a thousand times slower.
        sums = (
            float(np.einsum("i,i->", ref, ref)),
            float(np.einsum("i,i->", error, error)),
            float(np.einsum("i,i->", ref, cand)),
            float(np.einsum("i,i->", cand, cand)),
            float(abs_error.sum()),
        )
        self.signal += sums[0]
        self.noise += sums[1]
        self.dot += sums[2]
        self.candidate_energy += sums[3]
        self.sum_abs += sums[4]
        if error.size:
            self.max_abs = max(self.max_abs, float(abs_error.max()))
        self.count += error.size
        if not all(math.isfinite(value) for value in sums):
            self.nonfinite[0] += int(ref.size - np.count_nonzero(np.isfinite(ref)))
            self.nonfinite[1] += int(cand.size - np.count_nonzero(np.isfinite(cand)))
        reference = np.asarray(reference)
        if self.classify and is_classifier_like(reference):
            classes = reference.shape[-1]
            ref_rows, cand_rows = ref.reshape(-1, classes), cand.reshape(-1, classes)
            self.rows += ref_rows.shape[0]
            self.rows_agreeing += int(np.sum(ref_rows.argmax(-1) == cand_rows.argmax(-1)))
            self.top_k_hits += float(np.sum(top_k_overlap(ref_rows, cand_rows)))

    def result(self) -> OutputMetrics:
        """The metrics over everything seen."""
        return OutputMetrics(
            name=self.name,
            sqnr_db=sqnr_db(self.signal, self.noise),
            cosine=cosine(self.dot, self.signal, self.candidate_energy),
            max_abs_error=self.max_abs,
            mean_abs_error=self.sum_abs / self.count if self.count else 0.0,
            relative_error=relative_error(self.signal, self.noise),
            top1_agreement=self.rows_agreeing / self.rows if self.rows else None,
            top5_overlap=self.top_k_hits / self.rows if self.rows else None,
            values=self.count,
            nonfinite_reference=self.nonfinite[0],
            nonfinite_candidate=self.nonfinite[1],
        )


def sqnr_db(signal_energy: float, noise_energy: float) -> float:
    """Signal-to-quantization-noise ratio in dB; inf for no noise, -inf for no signal."""
    if math.isnan(signal_energy) or math.isnan(noise_energy):
        return math.nan
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


def relative_error(signal_energy: float, noise_energy: float) -> float:
    """|r - c|_2 / |r|_2; 0 when both are zero, inf when only the reference is."""
    if noise_energy == 0.0:
        return 0.0
    if signal_energy == 0.0:
        return math.inf
    return math.sqrt(noise_energy / signal_energy)


def top_k_overlap(reference: np.ndarray, candidate: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Per row of two [rows, classes] arrays: the share of the k top classes both agree on."""
    k = min(k, reference.shape[-1])
    top_ref = np.argpartition(-reference, k - 1, axis=-1)[:, :k]
    top_cand = np.argpartition(-candidate, k - 1, axis=-1)[:, :k]
    shared = (top_ref[:, :, None] == top_cand[:, None, :]).any(-1).sum(-1)
    return shared / k


def is_classifier_like(array: np.ndarray) -> bool:
    """Scores over classes: a float tensor whose last axis has 2 or more entries."""
    return array.ndim >= 2 and array.shape[-1] >= 2 and np.issubdtype(array.dtype, np.floating)
