"""A raise that leans a classifier's class scores is refused; one that helps without is not.

`class_shift` measures the mean shift of the log-scores a decision compares (candidate
against float); the held-out score carries it (`Fidelity.class_shifts`), and the raise
phase refuses a raise that leaves it beyond noise and doubled (`Fidelity.leans_more`).
"""

from __future__ import annotations

import numpy as np
import pytest

from qconvert.class_shift import class_shift
from qconvert.pipelines.held_out import HeldOut
from qconvert.recipe_fidelity import SHIFT_GROWTH, SHIFT_RATIO, Fidelity
from qconvert.testing._build import checked_model


def _two_class(shift_on_class_1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((len(shift_on_class_1), 2))
    candidate = reference.copy()
    candidate[:, 1] += shift_on_class_1
    return reference, candidate


def test_two_classes_read_the_t_statistic_of_the_gap_squared():
    # Class 1's logit moved by 0.5 and 0.1 in turn: mean 0.3, sample variance
    # 0.04 * 16 / 15; centred over the two classes, the shift is (-0.15, +0.15).
    reference, candidate = _two_class(np.array([0.5, 0.1] * 8))
    shift = class_shift(reference, candidate)
    assert shift.rows == 16
    assert shift.energy == pytest.approx(2 * 0.15**2)
    assert shift.ratio == pytest.approx(16 * 0.3**2 / (0.04 * 16 / 15))


def test_a_constant_added_to_every_class_is_no_shift():
    rng = np.random.default_rng(1)
    reference = rng.standard_normal((16, 5))
    candidate = reference + rng.standard_normal((16, 1))  # one constant a row
    shift = class_shift(reference, candidate)
    assert shift.energy == pytest.approx(0.0, abs=1e-24)
    assert shift.ratio == pytest.approx(0.0, abs=1e-9)


def test_noise_reads_near_one_and_a_lean_far_above():
    rng = np.random.default_rng(2)
    noise = 0.3 * rng.standard_normal(64)
    assert class_shift(*_two_class(noise)).ratio < SHIFT_RATIO
    assert class_shift(*_two_class(noise + 0.3)).ratio > 10 * SHIFT_RATIO


def test_probabilities_are_read_as_their_logarithms():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((16, 3))
    moved = logits + np.array([0.0, 0.2, 0.0]) + 0.1 * rng.standard_normal((16, 3))

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    on_logits = class_shift(logits, moved)
    on_probabilities = class_shift(softmax(logits), softmax(moved))
    assert on_probabilities.energy == pytest.approx(on_logits.energy, rel=1e-6)
    assert on_probabilities.ratio == pytest.approx(on_logits.ratio, rel=1e-6)


def test_classes_never_ranked_first_or_second_do_not_count():
    reference = np.tile([5.0, 4.0, -3.0, -3.0, -3.0], (16, 1))
    reference[::2, :2] = reference[::2, 1::-1]  # classes 0 and 1 take turns first
    candidate = reference.copy()
    candidate[:, 4] += np.linspace(1.0, 2.0, 16)  # the far tail moves, nothing decides
    assert class_shift(reference, candidate).energy == 0.0
    candidate[:, 1] += np.linspace(0.1, 0.2, 16)
    assert class_shift(reference, candidate).energy > 0.0


def test_fewer_than_two_rows_or_classes_are_not_measured():
    assert class_shift(np.ones((1, 4)), np.ones((1, 4))) is None
    assert class_shift(np.ones((8, 1)), np.ones((8, 1))) is None
    assert class_shift(np.ones((2, 3, 4)), np.ones((2, 3, 4))) is None


# Scored in onnxruntime: a two-class Gemm and Softmax, float against three candidates.
SOFTMAX = """
    <ir_version: 8, opset_import: ["" : 17]>
    classifier (float[1,8] input) => (float[1,2] probabilities) {
        logits = Gemm <transB = 1> (input, w, b)
        probabilities = Softmax <axis = 1> (logits)
    }
"""


def _classifier(w: np.ndarray, b: np.ndarray) -> bytes:
    inits = {"w": w.astype(np.float32), "b": b.astype(np.float32)}
    return checked_model(SOFTMAX, inits).SerializeToString()


def _scores() -> dict[str, Fidelity]:
    rng = np.random.default_rng(4)
    w = rng.standard_normal((2, 8))
    samples = [{"input": rng.standard_normal((1, 8)).astype(np.float32)} for _ in range(16)]
    scorer = HeldOut(_classifier(w, np.zeros(2)), samples)
    noise = rng.standard_normal((2, 8))
    return {
        # what the kept steps leave: weight noise
        "before": scorer.score(_classifier(w + 0.30 * noise, np.zeros(2))),
        # a raise that removes most of the noise and leans toward class 1
        "leaning": scorer.score(_classifier(w + 0.10 * noise, np.array([0.0, 0.15]))),
        # a raise that removes as much noise and leans toward nothing
        "clean": scorer.score(_classifier(w + 0.10 * noise, np.zeros(2))),
    }


def test_a_raise_that_leans_a_classifier_is_refused_and_one_that_does_not_is_kept():
    score = _scores()
    before, leaning, clean = score["before"], score["leaning"], score["clean"]
    # SQNR and top-1 agreement favour both raises: neither can see the lean.
    assert leaning.improves(before) and clean.improves(before)
    assert leaning.top1_agreement >= before.top1_agreement
    (lean,), (was,) = leaning.class_shifts, before.class_shifts
    assert lean.ratio >= SHIFT_RATIO and lean.energy >= SHIFT_GROWTH * was.energy
    assert leaning.leans_more(before)
    assert leaning.lean_detail(before).startswith("class scores lean: mean shift ")
    assert not clean.leans_more(before)


def test_a_lean_the_kept_steps_left_is_no_cause_to_refuse():
    score = _scores()
    # The leaning model as the start: a raise that keeps its lean is not refused.
    assert not score["leaning"].leans_more(score["leaning"])


def test_outputs_that_are_not_batch_by_class_carry_no_shift():
    rng = np.random.default_rng(5)
    # a detector-shaped head: [1, 6, 20], class scores over anchors, no [batch, classes]
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        head (float[1,6,20] input) => (float[1,6,20] output) {
            output = Sigmoid (input)
        }
    """
    proto = checked_model(text, {})
    samples = [{"input": rng.standard_normal((1, 6, 20)).astype(np.float32)} for _ in range(4)]
    score = HeldOut(proto.SerializeToString(), samples).score(proto.SerializeToString())
    assert score.class_shifts == ()
    assert not score.leans_more(score)
