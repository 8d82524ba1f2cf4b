"""A classifier's floor is the flips its margins predict, not a fixed SQNR.

`class_flips` turns the held-out rows' float margins and the measured margin error into
the flips expected; `Fidelity.meets` holds a classifier output to the agreement floor on
them. A classifier far from any tie skips the raise phase at a low SQNR; one with rows
near a tie raises what cuts their error. Only what the graph writes as class scores (or
probabilities) is scored as a classifier: a pooled embedding is not.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx_ir import serde

import qconvert
from qconvert import testing
from qconvert.class_flips import expected_flips
from qconvert.class_outputs import class_score_outputs
from qconvert.pipelines.held_out import HeldOut
from qconvert.recipe_fidelity import Fidelity
from qconvert.recipe_result import RecipeOptions
from qconvert.testing._build import checked_model

SAMPLES = 48


def test_two_classes_flip_by_their_margin_over_the_rms_error():
    margins = np.array([0.1, 0.5, 1.0, 2.0, 4.0, 8.0])
    errors = np.array([0.2, -0.3, 0.1, -0.2, 0.3, -0.1])  # on each row's top-two margin
    reference = np.stack([margins, np.zeros(6)], axis=1)
    candidate = reference.copy()
    candidate[:, 0] += errors
    sigma = float(np.sqrt(np.mean(errors**2)))
    by_hand = sum(NormalDist().cdf(-m / sigma) for m in margins)
    flips = expected_flips(reference, candidate)
    assert flips.rows == 6 and flips.sigma == pytest.approx(sigma)
    assert flips.flips == pytest.approx(by_hand)
    assert flips.rate == pytest.approx(by_hand / 6)

    # As probabilities (a Softmax's output) the log-probabilities' margins are the
    # logits' margins: the same flips.
    def softmax(x):
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    as_probabilities = expected_flips(softmax(reference), softmax(candidate))
    assert as_probabilities.flips == pytest.approx(by_hand, rel=1e-6)


def test_a_near_tie_with_two_classes_counts_both():
    # Row 0: the top class 0.1 above two others; row 1: 9 above both. The error on the
    # top-two margin is 0.1 on each row, so sigma is 0.1.
    reference = np.array([[1.0, 0.9, 0.9], [10.0, 1.0, 0.0]])
    candidate = reference + np.array([[0.1, 0.0, 0.0], [0.0, -0.1, 0.0]])
    flips = expected_flips(reference, candidate)
    assert flips.sigma == pytest.approx(0.1)
    assert flips.flips == pytest.approx(2 * NormalDist().cdf(-1.0), rel=1e-9)
    assert expected_flips(reference, reference).flips == 0.0


def test_the_floor_holds_on_expected_flips_not_on_sqnr():
    options = RecipeOptions()
    flips = expected_flips(np.array([[30.0, 0.0]] * 16), np.array([[29.0, 1.0]] * 16))
    assert flips.flips < 1e-6
    wide = Fidelity(sqnr_db=14.0, top1_agreement=1.0, top1_rows=16, expected_flips=(flips,))
    assert wide.meets(options)
    # Another output that is no classifier keeps the SQNR floor.
    assert not Fidelity(
        sqnr_db=14.0,
        top1_agreement=1.0,
        top1_rows=16,
        expected_flips=(flips,),
        rest_sqnr_db=20.0,
    ).meets(options)
    # Half a row of 16 expected to flip is over the 3% the 97% floor allows (0.48).
    near = expected_flips(
        np.array([[0.0005, 0.0]] + [[30.0, 0.0]] * 15),
        np.array([[0.0005, 0.02]] + [[30.0, 0.02]] * 15),
    )
    assert 0.48 < near.flips < 0.5
    close = Fidelity(sqnr_db=40.0, top1_agreement=1.0, top1_rows=16, expected_flips=(near,))
    assert not close.meets(options)
    # One row of 16 counted flipping is a 100% floor, not 97%: the expected count decides.
    # Row 0 leads by 0.2 and flips (its margin error is -0.3); the others lead by 30 with
    # errors of +-0.3 too: sigma 0.3, and row 0 flips with a chance of Phi(-2/3).
    one_flipped = expected_flips(
        np.array([[0.2, 0.0]] + [[30.0, 0.0]] * 15),
        np.array([[0.0, 0.1]] + [[30.3, 0.0], [29.7, 0.0]] * 7 + [[30.3, 0.0]]),
    )
    assert one_flipped.flips == pytest.approx(NormalDist().cdf(-2 / 3))
    assert Fidelity(
        sqnr_db=40.0, top1_agreement=15 / 16, top1_rows=16, expected_flips=(one_flipped,)
    ).meets(options)
    # Without flips (none measured), the SQNR floor and the count as before.
    assert not Fidelity(sqnr_db=40.0, top1_agreement=15 / 16, top1_rows=16).meets(options)
    assert not Fidelity(sqnr_db=14.0, top1_agreement=1.0, top1_rows=16).meets(options)


def _outlier_classifier(head_bias: np.ndarray) -> onnx.ModelProto:
    """Gemm `stem` (16 -> 16) -> Relu -> Gemm `head` (16 -> 4, bias `head_bias`).

    Its input's feature 0 is about 1000 and unused: the input's uint8 grid is then 4
    wide, and the features the stem reads (about 1) round to nothing, so the class scores
    lose what the input says; only keeping the stem float recovers it.
    """
    rng = np.random.default_rng(0)
    stem = rng.standard_normal((16, 16)).astype(np.float32)
    stem[0] = 0.0
    model = checked_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        outlier (float[1,16] input) => (float[1,4] output) {
            h = Gemm (input, w_stem, b_stem)
            r = Relu (h)
            output = Gemm (r, w_head, b_head)
        }
        """,
        {
            "w_stem": stem,
            "b_stem": np.zeros(16, np.float32),
            "w_head": (rng.standard_normal((16, 4)) / 2).astype(np.float32),
            "b_head": head_bias.astype(np.float32),
        },
    )
    model.graph.node[0].name, model.graph.node[2].name = "stem", "head"
    return model


def _outlier_samples(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        row = rng.standard_normal((1, 16)).astype(np.float32)
        row[0, 0] = 1000.0 + rng.standard_normal()
        samples.append({"input": row})
    return samples


def _top1(path, samples) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.array([session.run(None, feeds)[0].argmax() for feeds in samples])


def _quantized(tmp_path, head_bias: np.ndarray):
    """The recipe's result on `_outlier_classifier`, and the written model's top-1
    agreement with the float model and SQNR on 64 fresh samples."""
    path = testing.save(_outlier_classifier(head_bias), tmp_path / "model.onnx")
    testing.write_samples(tmp_path / "calib", _outlier_samples(SAMPLES, seed=1))
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(
        path, out, data=tmp_path / "calib", recipe=RecipeOptions(budget=1.0)
    )
    fresh = _outlier_samples(64, seed=2)
    agreement = float(np.mean(_top1(path, fresh) == _top1(out, fresh)))
    return report.conversion.recipe, agreement, testing.output_sqnr(path, out, fresh)


def test_a_classifier_far_from_a_tie_skips_the_raise_phase_at_a_low_sqnr(tmp_path):
    # Class 0 leads by about 40 on every row: the stem's lost input moves the scores by
    # about 10, for 12 dB, far under the 25 dB floor, and flips nothing.
    recipe, agreement, sqnr = _quantized(tmp_path, np.array([40.0, 0.0, 0.0, 0.0]))
    assert recipe.final.sqnr_db < 15.0, recipe.final
    assert recipe.final.flip_rate < 1e-3, recipe.final
    assert recipe.raise_search.skipped == "the floor already holds"
    assert recipe.raised == ()
    assert agreement == 1.0 and sqnr < 25.0


def test_a_classifier_near_a_tie_raises_what_cuts_its_error(tmp_path):
    # No class leads: the same error flips a third of the rows.
    recipe, agreement, sqnr = _quantized(tmp_path, np.zeros(4))
    assert recipe.start.flip_rate > 0.2, recipe.start
    # The head raised reads its input float, and the stem that writes it computes in
    # float with it (the float-reader rule): the input is no longer rounded.
    assert [node.name for node in recipe.raised] == ["head"], recipe.raise_search
    assert recipe.final.flip_rate < 1e-3, recipe.final
    assert agreement >= 0.97 and sqnr > 25.0


def test_a_pooled_embedding_is_no_classifier_but_probabilities_are():
    # Two [1, 8] outputs: a mean over a sequence's positions, and a Softmax spelled out
    # as Exp and Div over a MatMul's scores.
    rng = np.random.default_rng(0)
    model = checked_model(
        """
        <ir_version: 8, opset_import: ["" : 18]>
        two (float[1,5,8] input) => (float[1,8] pooled, float[1,8] probs) {
            pooled = ReduceMean <keepdims = 0> (input, axes)
            scores = MatMul (pooled, w)
            e = Exp (scores)
            total = ReduceSum <keepdims = 1> (e, axes)
            probs = Div (e, total)
        }
        """,
        {
            "w": (rng.standard_normal((8, 8)) / 4).astype(np.float32),
            "axes": np.array([1], np.int64),
        },
    )
    assert class_score_outputs(serde.deserialize_model(model)) == frozenset()
    samples = [{"input": rng.standard_normal((1, 5, 8)).astype(np.float32)} for _ in range(4)]
    held = HeldOut(model.SerializeToString(), samples, classifiers=frozenset())
    score = held.score(model.SerializeToString())
    # Only the probabilities are scored as a classifier's: one lean, one flip count.
    assert len(score.expected_flips) == 1 and len(score.class_shifts) == 1
    assert score.rest_sqnr_db == np.inf  # the pooled output: the float model itself
    # Every [batch, classes] output, without the graph's word (as before).
    assert (
        len(
            HeldOut(model.SerializeToString(), samples)
            .score(model.SerializeToString())
            .expected_flips
        )
        == 2
    )


def test_logits_a_layer_writes_are_class_scores():
    rng = np.random.default_rng(0)
    model = testing.gemm_bias(rng.standard_normal((4, 8)), np.zeros(4))
    assert class_score_outputs(serde.deserialize_model(model)) == {"output"}
