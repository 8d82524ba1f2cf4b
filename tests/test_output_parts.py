"""Outputs a Concat assembles are scored part by part: a small part's loss is not hidden."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from qconvert import testing
from qconvert.output_parts import Parts, concat_parts
from qconvert.pipelines.recipe import HeldOut

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


def test_the_parts_of_a_concatenated_output_are_sized_from_its_inputs():
    weights = 0.6 * np.random.default_rng(1).standard_normal((16, CLASSES))
    parts = concat_parts(_inferred(_head(weights)))
    # `boxes` is an output too, but no Concat writes it: scored whole.
    assert parts == {"output": Parts(axis=1, sizes=(4, CLASSES))}
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
    whole_db, scores_db = _sqnr(ref, cand), _sqnr(ref[:, 4:], cand[:, 4:])
    assert whole_db > 60 and scores_db < 35  # the whole output hides the scores' loss

    data = reference.SerializeToString()
    blind = HeldOut(data, samples).score(candidate.SerializeToString())
    parts = concat_parts(_inferred(reference))
    seeing = HeldOut(data, samples, parts).score(candidate.SerializeToString())
    assert abs(blind.sqnr_db - whole_db) < 0.01
    assert abs(seeing.sqnr_db - scores_db) < 0.01
    # Each sample's score is its worst part's too.
    first = outputs(reference)[:4], outputs(candidate)[:4]
    assert abs(seeing.per_sample_db[0] - _sqnr(first[0][:, 4:], first[1][:, 4:])) < 0.01
