"""A sequence of class distributions (a CTC recognizer's output) is scored by its frames."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import pytest

import qconvert
from qconvert import testing
from qconvert.pipelines.held_out import HeldOut
from qconvert.recipe_fidelity import Fidelity, frames_resolve, verdict_detail, wins_needed
from qconvert.recipe_result import RecipeOptions
from qconvert.runtime import make_session
from qconvert.sequence_scores import frames_disagreeing, is_distribution_sequence

FRAMES, FEATURES, CLASSES = 12, 8, 30


def ctc_head(w: np.ndarray, *, log: bool = False) -> onnx.ModelProto:
    """MatMul then (Log)Softmax over the classes: input [N, T, K] -> output [N, T, C]."""
    k, c = w.shape
    op = "LogSoftmax" if log else "Softmax"
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        ctc_head (float[N,{FRAMES},{k}] input) => (float[N,{FRAMES},{c}] output) {{
            logits = MatMul (input, w)
            output = {op} <axis = -1> (logits)
        }}
    """
    model = onnx.parser.parse_model(text)
    model.graph.initializer.append(onnx.numpy_helper.from_array(w.astype(np.float32), "w"))
    onnx.checker.check_model(model, full_check=True)
    return model


def _samples(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"input": rng.standard_normal((1, FRAMES, FEATURES)).astype(np.float32)}
        for _ in range(count)
    ]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_only_rank3_distributions_count_as_sequences():
    rng = np.random.default_rng(0)
    logits = 3.0 * rng.standard_normal((1, FRAMES, CLASSES))
    probabilities = _softmax(logits).astype(np.float32)
    assert is_distribution_sequence(probabilities)
    assert is_distribution_sequence(np.log(probabilities))  # log-softmax
    # Raw logits, a recurrent state ([layers, batch, hidden]) and non-negative features
    # that do not sum to 1 are not class distributions; a [batch, classes] classifier
    # is not a sequence.
    assert not is_distribution_sequence(logits.astype(np.float32))
    assert not is_distribution_sequence(np.tanh(rng.standard_normal((2, 1, 128))))
    assert not is_distribution_sequence(np.abs(probabilities) * 2.0)
    assert not is_distribution_sequence(probabilities[:, 0])
    assert not is_distribution_sequence(probabilities.astype(np.int64))


def test_frames_disagreeing_counts_argmax_changes():
    reference = np.zeros((1, 4, 3), np.float32)
    reference[0, :, 0] = 1.0
    candidate = reference.copy()
    candidate[0, 1] = [0.2, 0.7, 0.1]
    candidate[0, 3] = [0.4, 0.1, 0.5]
    assert frames_disagreeing(reference, candidate) == (2, 4)


@pytest.mark.parametrize("log", [False, True])
def test_the_held_out_score_counts_frames_of_a_ctc_output(log):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((FEATURES, CLASSES))
    reference = ctc_head(w, log=log)
    samples = _samples(16)
    scorer = HeldOut(reference.SerializeToString(), samples)
    noisy = w + 0.3 * rng.standard_normal(w.shape)
    candidate = ctc_head(noisy, log=log)
    score = scorer.score(candidate.SerializeToString())
    # Counted here from the two models' own outputs, frame by frame.
    sessions = [make_session(m.SerializeToString()) for m in (reference, candidate)]
    wrong = []
    for feeds in samples:
        ref, cand = (s.run(None, feeds)[0][0] for s in sessions)
        wrong.append(int(np.sum(ref.argmax(-1) != cand.argmax(-1))))
    assert 0 < sum(wrong) < 16 * FRAMES
    assert score.frame_rows == 16 * FRAMES
    assert score.per_sample_frames == tuple(wrong)
    assert score.frame_agreement == pytest.approx(1 - sum(wrong) / (16 * FRAMES))
    assert score.sequence_agreement == sum(n == 0 for n in wrong) / 16
    assert score.top1_agreement is None  # not a [batch, classes] classifier
    assert "frames" in score.describe() and "sequences" in score.describe()
    # The same model scores every frame.
    same = scorer.score(reference.SerializeToString())
    assert same.frame_agreement == 1.0 and same.sequence_agreement == 1.0


def test_a_recurrent_state_output_keeps_its_sqnr_score():
    model = testing.lstm()
    samples = [testing.random_inputs(model, seed=i) for i in range(4)]
    score = HeldOut(model.SerializeToString(), samples).score(model.SerializeToString())
    assert score.frame_agreement is None and score.frame_rows == 0


def _frames(sqnr: float, wrong: list[int], frames: int = FRAMES) -> Fidelity:
    return Fidelity(
        sqnr_db=sqnr,
        top1_agreement=None,
        per_sample_db=tuple(sqnr + 0.01 * i for i in range(len(wrong))),
        frame_agreement=1 - sum(wrong) / (len(wrong) * frames),
        frame_rows=len(wrong) * frames,
        per_sample_frames=tuple(wrong),
    )


def test_frames_decide_a_step_not_the_sqnr():
    before = _frames(20.0, [2] * 16)
    # Fewer frames wrong on 14 of 16 samples: kept, though the SQNR fell.
    fewer = _frames(19.0, [1] * 14 + [2] * 2)
    assert fewer.improves(before)
    assert fewer.gain_db(before) == pytest.approx(10 * np.log10(32 / 18))
    assert verdict_detail(fewer, before) == "better on 14/16 samples (12 needed)"
    # The SQNR up by 3 dB, but 16 frames more wrong (48 against 32, past the spread of
    # 8.9 two such counts have): dropped.
    louder = _frames(23.0, [3] * 16)
    assert louder.scored_by_frames(before)
    assert not louder.improves(before)
    # Fewer frames wrong over all, but carried by 3 samples: a sign test of frames
    # resolved over all (22 against 32, spread 7.3) still drops it.
    carried = _frames(20.0, [0] * 5 + [2] * 11)
    assert carried.scored_by_frames(before)
    assert not carried.improves(before)
    detail = verdict_detail(carried, before)
    # 5 untied samples: even 5 of 5 (p = 1/32) is not 2.5%.
    assert detail == "gain within noise: better on 5/16 samples (6 needed)"


def test_frames_within_their_counting_noise_leave_the_decision_to_the_sqnr():
    before = _frames(20.0, [2] * 16)  # 32 frames wrong
    # 29 frames wrong (3 fewer, against a spread of sqrt(61) = 7.8): the counts do not
    # tell the two apart, and the SQNR, up 2 dB on every sample, decides: kept.
    louder = _frames(22.0, [2] * 13 + [1] * 3)
    assert not louder.scored_by_frames(before)
    assert louder.improves(before)
    assert louder.gain_db(before) == pytest.approx(2.0)
    assert louder.better_on_balance(before, min_gain_db=0.5)
    # The same frames with the SQNR down: dropped, the frames' 3 notwithstanding.
    quieter = _frames(19.0, [2] * 13 + [1] * 3)
    assert not quieter.improves(before)
    assert not quieter.better_on_balance(before)
    # 4 more frames wrong (also within the noise) and the SQNR up: kept.
    assert _frames(22.0, [2] * 12 + [3] * 4).improves(before)


@pytest.mark.parametrize(
    ("mine", "theirs", "resolved"),
    [(0, 0, False), (0, 1, False), (0, 2, True), (53, 56, False), (72, 56, True)],
)
def test_counts_resolve_past_one_standard_deviation_of_their_difference(
    mine, theirs, resolved
):
    assert frames_resolve(mine, theirs) is resolved


def test_frames_decide_when_their_counts_are_unknown():
    before = Fidelity(sqnr_db=20.0, top1_agreement=None, frame_agreement=0.9)
    louder = Fidelity(sqnr_db=23.0, top1_agreement=None, frame_agreement=0.9)
    assert louder.scored_by_frames(before) and not louder.improves(before)


def test_the_floor_of_a_sequence_output_is_whole_sequences_agreeing():
    options = RecipeOptions()
    # 99% of the frames agree and the SQNR is over 25 dB, but a third of the sequences
    # (the strings a decoder reads) have a frame wrong: below the floor.
    assert not _frames(40.0, [1] * 5 + [0] * 11, frames=100).meets(options)
    # Every sequence whole: met, though the SQNR is under 25 dB.
    assert _frames(12.0, [0] * 16).meets(options)


def test_the_recipe_scores_a_ctc_model_by_frames(tmp_path):
    rng = np.random.default_rng(2)
    model = ctc_head(rng.standard_normal((FEATURES, CLASSES)))
    path = testing.save(model, tmp_path / "model.onnx")
    testing.write_samples(tmp_path / "calib", _samples(48, seed=3))
    report = qconvert.quantize(path, tmp_path / "q.onnx", data=tmp_path / "calib")
    recipe = report.conversion.recipe
    assert recipe.start.frame_rows == 16 * FRAMES
    assert recipe.final.frame_agreement is not None
    assert recipe.final.frame_agreement >= recipe.start.frame_agreement
    notes = "\n".join(report.conversion.notes)
    assert "frames" in notes and "of sequences" in notes


def test_a_ctc_head_with_less_weight_error_is_kept_by_sqnr_when_frames_cannot_tell():
    # Two candidates of one CTC head run in onnxruntime: one with an extra weight error
    # (as a rounding bias correction removes), one without it.
    rng = np.random.default_rng(4)
    w = rng.standard_normal((FEATURES, CLASSES))
    scorer = HeldOut(ctc_head(w).SerializeToString(), _samples(16, seed=5))
    shared, extra = rng.standard_normal((2, *w.shape))
    worse = scorer.score(ctc_head(w + 0.1 * shared + 0.1 * extra).SerializeToString())
    better = scorer.score(ctc_head(w + 0.1 * shared).SerializeToString())
    wrong = (better.disagreeing_frames, worse.disagreeing_frames)
    # Frames within their counting noise (a frame or so apart, against a spread of 7).
    assert abs(wrong[0] - wrong[1]) < np.sqrt(sum(wrong))
    # Frames alone could not keep it: their sign test needs more samples than it wins.
    pairs = list(zip(better.per_sample_frames, worse.per_sample_frames, strict=True))
    wins, untied = sum(a < b for a, b in pairs), sum(a != b for a, b in pairs)
    assert wins < wins_needed(untied)
    # The SQNR sees the error gone on nearly every sample: it decides, and keeps it.
    assert better.sqnr_db > worse.sqnr_db + 1.0
    assert not better.scored_by_frames(worse)
    assert better.improves(worse)
    assert better.better_on_balance(worse, min_gain_db=0.5)
