"""Outputs a Concat assembles are scored part by part: a small part's loss is not hidden."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from qconvert import testing
from qconvert.output_parts import Parts, concat_parts
from qconvert.pipelines.held_out import HeldOut
from qconvert.testing._build import checked_model

CLASSES = 3


def _head(score_weights: np.ndarray) -> onnx.ModelProto:
    """Boxes in pixels and class probabilities concatenated into `output`; boxes alone too."""
    return testing.detector_head(
        8, CLASSES, hidden=16, score_weights=score_weights, flat=True, boxes_output=True
    )


def _inferred(model: onnx.ModelProto) -> ir.Model:
    """The model with its shapes inferred, as the recipe's prepared model has them."""
    return ir.from_proto(onnx.shape_inference.infer_shapes(model))


def _sqnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    ref = reference.astype(np.float64)
    return float(10 * np.log10((ref**2).sum() / ((ref - candidate) ** 2).sum()))


def _logit_sqnr(reference: np.ndarray, candidate: np.ndarray, samples: int = 1) -> float:
    """SQNR of the logits of probabilities, the signal being the reference's spread
    about its mean on each of `samples` equal slices along axis 0."""
    signal = noise = 0.0
    for ref, cand in zip(
        np.split(reference.astype(np.float64), samples),
        np.split(candidate.astype(np.float64), samples),
        strict=True,
    ):
        ref, cand = np.log(ref / (1 - ref)), np.log(cand / (1 - cand))
        signal += ((ref - ref.mean()) ** 2).sum()
        noise += ((ref - cand) ** 2).sum()
    return float(10 * np.log10(signal / noise))


def test_the_parts_of_a_concatenated_output_are_sized_from_its_inputs():
    weights = 0.6 * np.random.default_rng(1).standard_normal((16, CLASSES))
    parts = concat_parts(_inferred(_head(weights)))
    # `boxes` is an output too, but no Concat writes it: scored whole.
    assert parts == {"output": Parts(axis=1, sizes=(4, CLASSES), sigmoid=(False, True))}
    whole = np.arange(2 * 7 * 2).reshape(2, 7, 2)
    assert [p.shape for p in parts["output"].split(whole)] == [(2, 4, 2), (2, 3, 2)]
    # An array the sizes do not fit (another layout) is not split.
    assert [p.shape for p in parts["output"].split(np.zeros((2, 5)))] == [(2, 5)]


def test_the_held_out_score_sees_a_loss_in_the_small_part_of_an_output():
    rng = np.random.default_rng(2)
    weights = 0.6 * rng.standard_normal((16, CLASSES))
    reference = _head(weights)
    # The candidate's class probabilities are off by a few points; its boxes are exact.
    candidate = _head(weights + 0.05 * rng.standard_normal(weights.shape))
    samples = [{"input": rng.standard_normal((4, 8)).astype(np.float32)} for _ in range(16)]

    def outputs(model):
        session = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        return np.concatenate([session.run(["output"], s)[0] for s in samples])

    ref, cand = outputs(reference), outputs(candidate)
    whole_db = _sqnr(ref, cand)
    scores_db = _logit_sqnr(ref[:, 4:], cand[:, 4:], samples=len(samples))
    assert whole_db > 60 and scores_db < 35  # the whole output hides the scores' loss

    data = reference.SerializeToString()
    blind = HeldOut(data, samples).score(candidate.SerializeToString())
    parts = concat_parts(_inferred(reference))
    seeing = HeldOut(data, samples, parts).score(candidate.SerializeToString())
    assert abs(blind.sqnr_db - whole_db) < 0.01
    assert abs(seeing.sqnr_db - scores_db) < 0.01
    # Each sample's score is its worst part's too.
    first = outputs(reference)[:4], outputs(candidate)[:4]
    assert abs(seeing.per_sample_db[0] - _logit_sqnr(first[0][:, 4:], first[1][:, 4:])) < 0.01


def test_a_sigmoid_part_is_scored_by_its_logits_whatever_its_probabilities():
    """Class probabilities far below any threshold (nothing detected) carry the same
    network error in their logits: scored as probabilities a logit error of 0.5 on
    scores near 1e-4 reads as 8 dB and near 0.5 as 12 dB; as logits both read alike."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0.0, 2.0, (8, CLASSES, 50))
    error = rng.normal(0.0, 0.2, logits.shape)
    parts = Parts(axis=1, sizes=(4, CLASSES), sigmoid=(False, True))
    boxes = rng.uniform(0, 320, (8, 4, 50))

    def scored(offset):
        ref = np.concatenate([boxes, 1 / (1 + np.exp(-(logits + offset)))], axis=1)
        cand = np.concatenate([boxes, 1 / (1 + np.exp(-(logits + offset + error)))], axis=1)
        (box_ref, box_cand), (score_ref, score_cand) = parts.pairs(ref, cand)
        assert np.array_equal(box_ref, boxes) and np.array_equal(box_cand, boxes)
        return _sqnr(score_ref, score_cand), _sqnr(ref[:, 4:], cand[:, 4:])

    near_zero, near_zero_probabilities = scored(-9.0)
    centred, centred_probabilities = scored(0.0)
    assert abs(near_zero - centred) < 0.15  # the mean is no signal, so the offset is gone
    assert abs(near_zero - 10 * np.log10(4.0 / 0.04)) < 0.5  # spread 2 against error 0.2
    assert abs(near_zero_probabilities - centred_probabilities) > 3.0


def test_a_sigmoid_part_is_found_through_a_reshape():
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        head (float[1,4,6] boxes, float[1,12] logits) => (float[1,6,6] output) {
            scores = Sigmoid (logits)
            shaped = Reshape (scores, shape)
            output = Concat <axis = 1> (boxes, shaped)
        }
    """
    model = checked_model(text, {"shape": np.array([1, 2, 6], np.int64)})
    parts = concat_parts(_inferred(model))
    assert parts == {"output": Parts(axis=1, sizes=(4, 2), sigmoid=(False, True))}
