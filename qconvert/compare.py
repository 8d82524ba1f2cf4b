"""Run a reference and a candidate model on the same samples and measure the difference."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qconvert.dataset import LABELS_FILE, DirectorySource
from qconvert.errors import CalibrationDataError
from qconvert.metrics import OutputAccumulator, OutputMetrics
from qconvert.runtime import make_session


@dataclass(frozen=True, slots=True)
class Comparison:
    """The outcome of running both models on the same samples."""

    samples: int
    outputs: tuple[OutputMetrics, ...]
    reference_accuracy: float | None = None
    candidate_accuracy: float | None = None

    @property
    def accuracy_drop_points(self) -> float | None:
        """Reference accuracy minus candidate accuracy, in percentage points."""
        if self.reference_accuracy is None or self.candidate_accuracy is None:
            return None
        return 100.0 * (self.reference_accuracy - self.candidate_accuracy)


def load_labels(folder: str | Path, samples: int) -> np.ndarray | None:
    """The folder's `labels.npy` (one integer label per sample), or None if absent."""
    path = Path(folder) / LABELS_FILE
    if not path.exists():
        return None
    try:
        labels = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CalibrationDataError(f"Labels file '{path}' could not be read: {exc}") from None
    labels = labels.reshape(-1)
    if labels.size != samples:
        raise CalibrationDataError(
            f"Labels file '{path}' holds {labels.size} labels for {samples} samples."
        )
    return labels


def compare_models(
    reference: bytes | str,
    candidate: bytes | str,
    source: DirectorySource,
    *,
    labels: np.ndarray | None = None,
    on_sample: Callable[[], None] | None = None,
) -> Comparison:
    """Streams every sample of `source` through both models; labels score the first output."""
    reference_session = make_session(reference)
    candidate_session = make_session(candidate)
    names = [output.name for output in reference_session.get_outputs()]
    accumulators = [OutputAccumulator(name) for name in names]
    hits = [0, 0]
    for index, sample in enumerate(source):
        expected = reference_session.run(None, sample.feeds)
        actual = candidate_session.run(None, sample.feeds)
        for accumulator, ref, cand in zip(accumulators, expected, actual, strict=True):
            accumulator.update(ref, cand)
        if labels is not None:
            hits[0] += int(np.argmax(expected[0].reshape(-1)) == labels[index])
            hits[1] += int(np.argmax(actual[0].reshape(-1)) == labels[index])
        if on_sample is not None:
            on_sample()
    count = len(source)
    return Comparison(
        samples=count,
        outputs=tuple(accumulator.result() for accumulator in accumulators),
        reference_accuracy=hits[0] / count if labels is not None else None,
        candidate_accuracy=hits[1] / count if labels is not None else None,
    )
