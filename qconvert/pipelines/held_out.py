"""Scores converted models against the float model on the recipe's held-out samples.

Each output counts by its worst part (`output_parts`), classifier-like [batch, classes]
outputs by their top-1 agreement too, and sequences of class distributions by their
frames (`sequence_scores`). The recipe (`pipelines.recipe`) keeps or drops each step by
what this measures (`recipe_fidelity.Fidelity`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from qconvert.class_flips import ExpectedFlips, expected_flips
from qconvert.class_shift import ClassShift, class_shift
from qconvert.dataset import Feeds
from qconvert.metrics import OutputAccumulator, is_classifier_like, sqnr_db
from qconvert.output_parts import Parts
from qconvert.recipe_fidelity import Fidelity, can_still_hold
from qconvert.runtime import make_session
from qconvert.sequence_scores import (
    are_distributions,
    frames_disagreeing,
    is_distribution_sequence,
)


class HeldOut:
    """Scores converted models against the float model's outputs on fixed samples.

    `parts`: the outputs a Concat assembles (`output_parts.concat_parts`); each part is
    scored alone, and the worst counts, as for separate outputs. `classifiers`: the
    outputs the graph writes as class scores (`class_outputs.class_score_outputs`); a
    [batch, classes] output is scored as a classifier's when it is one of them, or when
    its rows are probability distributions. None: every [batch, classes] float output.
    """

    def __init__(
        self,
        float_model: bytes,
        samples: Sequence[Feeds],
        parts: Mapping[str, Parts] | None = None,
        *,
        weights: Mapping[str, np.ndarray] | None = None,
        classifiers: frozenset[str] | None = None,
    ) -> None:
        """`weights`: the large initializers `float_model` was serialized without."""
        self.samples = list(samples)
        self.parts = dict(parts or {})
        self.classifiers = classifiers
        # Scores only: no blocked-layout copy of the weights (`runtime.NCHWC_TRANSFORMER`),
        # here and in the candidates' sessions, which it is compared against.
        session = make_session(float_model, quiet=True, weights=weights, reorder_layout=False)
        self.output_names = [output.name for output in session.get_outputs()]
        self.reference = [session.run(None, feeds) for feeds in self.samples]
        # Outputs that are sequences of class distributions on every sample are scored
        # by their frames' top-1 agreement (`sequence_scores`).
        self.sequences = frozenset(
            index
            for index in range(len(self.output_names))
            if self.reference
            and all(is_distribution_sequence(ref[index]) for ref in self.reference)
        )
        # Which outputs are scored as a classifier's, and their float rows: fixed by the
        # reference, so decided once, not at every candidate scored.
        self.classifying = frozenset(
            index
            for index in range(len(self.output_names))
            if self.reference and self._classifies(index)
        )
        self._reference_rows = {
            index: _stacked_rows(self.reference, index, self._classes(index))
            for index in self.classifying
        }

    def score(
        self,
        model: bytes,
        weights: Mapping[str, np.ndarray] | None = None,
        *,
        against: Fidelity | None = None,
        spin: bool = True,
    ) -> Fidelity | None:
        """The fidelity of `model` (serialized, without the `weights` handed beside it).

        `against`: stop, and give None, as soon as `model` can no longer beat it on
        enough samples one by one (`Fidelity.holds_on_samples`), so it cannot improve on
        it (`Fidelity.improves`): the samples left are not run. Where frames may decide
        (sequences of class distributions: whether they do depends on both final
        counts, `Fidelity.scored_by_frames`), it stops only once neither the frames nor
        the SQNR could win. `spin=False`: the session's idle threads do not busy-wait (for
        a scoring that runs beside other work); the outputs are the same.
        """
        session = make_session(
            model, quiet=True, weights=weights, reorder_layout=False, spin=spin
        )
        theirs = self._sample_values(against) if against is not None else []
        outputs = []
        wins, losses = [0] * len(theirs), [0] * len(theirs)
        for index, feeds in enumerate(self.samples):
            outputs.append(session.run(self.output_names, feeds))
            if not theirs:
                continue
            left = len(self.samples) - index - 1
            held = False
            for measure, mine in enumerate(
                self._sample_value(self.reference[index], outputs[-1])
            ):
                other = theirs[measure][index]
                wins[measure] += mine > other
                losses[measure] += mine < other
                held = held or can_still_hold(wins[measure], losses[measure], left)
            if not held:
                return None
        per_sample = tuple(
            self._worst_sqnr(reference, candidate)
            for reference, candidate in zip(self.reference, outputs, strict=True)
        )
        worst, agreement, rows = math.inf, None, 0
        rest: float | None = None  # the worst output the flip floor does not cover
        disagreeing, frames = [0] * len(outputs), 0
        shifts: list[ClassShift | None] = []
        flips: list[ExpectedFlips | None] = []
        for index, name in enumerate(self.output_names):
            if index in self.sequences:
                for sample, (reference, candidate) in enumerate(
                    zip(self.reference, outputs, strict=True)
                ):
                    wrong, count = frames_disagreeing(reference[index], candidate[index])
                    disagreeing[sample] += wrong
                    frames += count
            # Class scores are [batch, classes]: a detector's [1, 84, anchors] head is
            # float over its last axis too, but its argmax over anchors means nothing.
            classify = index in self.classifying
            accumulator = OutputAccumulator(name, classify=classify)
            pieces: list[OutputAccumulator] = []
            for reference, candidate in zip(self.reference, outputs, strict=True):
                accumulator.update(reference[index], candidate[index])
                split = list(self._split(name, reference[index], candidate[index]))
                if len(split) < 2:
                    continue
                if not pieces:
                    pieces = [OutputAccumulator(name, classify=False) for _ in split]
                for piece, (ref_part, cand_part) in zip(pieces, split, strict=True):
                    piece.update(ref_part, cand_part)
            result = accumulator.result()
            if classify:
                rows = self._rows(index, outputs)
                shifts.append(class_shift(*rows) if rows is not None else None)
                flips.append(expected_flips(*rows) if rows is not None else None)
            for value in (result.sqnr_db, *(piece.result().sqnr_db for piece in pieces)):
                if not math.isnan(value):
                    worst = min(worst, value)
                    if not classify:
                        rest = value if rest is None else min(rest, value)
            if result.top1_agreement is not None:
                if agreement is None or result.top1_agreement < agreement:
                    agreement, rows = result.top1_agreement, accumulator.rows
        scores = Fidelity(
            sqnr_db=worst,
            top1_agreement=agreement,
            top1_rows=rows,
            per_sample_db=per_sample,
            class_shifts=tuple(shifts),
            expected_flips=tuple(flips),
            rest_sqnr_db=rest if flips else None,
        )
        if not frames:
            return scores
        return dataclasses.replace(
            scores,
            frame_agreement=1.0 - sum(disagreeing) / frames,
            frame_rows=frames,
            per_sample_frames=tuple(disagreeing),
        )

    def _sample_values(self, fidelity: Fidelity) -> list[tuple[float, ...]]:
        """`fidelity`'s per-sample scores as `Fidelity.paired` may pair them.

        By SQNR, and by minus the disagreeing frames where frames may decide; empty
        where unknown.
        """
        measures = [fidelity.per_sample_db]
        if self.sequences and fidelity.frame_agreement is not None:
            measures.append(tuple(-float(n) for n in fidelity.per_sample_frames))
        if any(len(values) != len(self.samples) for values in measures):
            return []
        return measures

    def _sample_value(self, reference: Sequence[np.ndarray], candidate) -> list[float]:
        """One sample's scores, as `_sample_values` lists them."""
        values = [self._worst_sqnr(reference, candidate)]
        if self.sequences:
            values.append(
                -float(
                    sum(
                        frames_disagreeing(reference[index], candidate[index])[0]
                        for index in self.sequences
                    )
                )
            )
        return values

    def _worst_sqnr(self, reference: Sequence[np.ndarray], candidate) -> float:
        """One sample's SQNR: its worst output's worst part (inf: none measurable)."""
        return min(
            (
                _sample_sqnr(ref_part, cand_part)
                for name, ref, cand in zip(
                    self.output_names, reference, candidate, strict=True
                )
                for ref_part, cand_part in self._split(name, ref, cand)
            ),
            default=math.inf,
        )

    def _classifies(self, index: int) -> bool:
        """Whether output `index` is scored as a classifier's: top-1, lean and flips.

        Class scores are [batch, classes]: a detector's [1, 84, anchors] head is float
        over its last axis too, but its argmax over anchors means nothing. And they are
        what the graph writes as class scores, or probabilities on every held-out row
        (a Softmax spelled out as Exp and Div): a pooled embedding is neither.
        """
        first = np.asarray(self.reference[0][index])
        if not (first.ndim == 2 and is_classifier_like(first)):
            return False
        if self.classifiers is None or self.output_names[index] in self.classifiers:
            return True
        return all(are_distributions(ref[index]) for ref in self.reference)

    def _classes(self, index: int) -> int:
        return np.asarray(self.reference[0][index]).shape[-1]

    def _rows(self, index: int, outputs) -> tuple[np.ndarray, np.ndarray] | None:
        """Output `index`'s [rows, classes] on every held-out sample, float and candidate.

        None where samples differ in their class count.
        """
        reference = self._reference_rows[index]
        if reference is None:
            return None
        candidate = _stacked_rows(outputs, index, self._classes(index))
        return (reference, candidate) if candidate is not None else None

    def _split(self, name: str, reference, candidate):
        """(reference, candidate) pairs of each part of output `name` (one: the whole)."""
        parts = self.parts.get(name)
        if parts is None:
            return [(reference, candidate)]
        return parts.pairs(reference, candidate)


def _stacked_rows(samples, index: int, classes: int) -> np.ndarray | None:
    """Output `index` of every sample as one [rows, classes] array (None: counts differ)."""
    try:
        return np.concatenate([np.reshape(sample[index], (-1, classes)) for sample in samples])
    except ValueError:
        return None


def _sample_sqnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    """One sample's SQNR of one output (nan where it has no finite measure)."""
    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    error = ref - np.asarray(candidate, dtype=np.float64).reshape(-1)
    # einsum, not `@`: see `metrics.OutputAccumulator.update`.
    return sqnr_db(
        float(np.einsum("i,i->", ref, ref)), float(np.einsum("i,i->", error, error))
    )
