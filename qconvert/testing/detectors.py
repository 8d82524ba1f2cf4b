"""Detector heads: outputs that join tensors of very different ranges."""

from __future__ import annotations

import numpy as np
import onnx

from qconvert.testing._build import checked_model, random_weights


def detector_head(
    features: int = 16,
    classes: int = 4,
    *,
    hidden: int = 32,
    score_weights: np.ndarray | None = None,
    flat: bool = False,
    boxes_output: bool = False,
    seed: int = 0,
) -> onnx.ModelProto:
    """A detector's head: box coordinates in pixels (0..640) beside class scores (0..1).

    Both go into one tensor, as detectors that export a single output tensor write it:
    input [N,F] -> MatMul to `hidden` units -> Relu, then a box branch and a score branch
    concatenated on axis 1.

    Args:
        features: F, the input's width.
        classes: how many class scores follow the 4 box coordinates.
        hidden: the width of the shared hidden layer.
        score_weights: the score branch's (hidden, classes) weights; None draws them
            (the random stream is the same either way, so the other weights are too).
        flat: output [N, 4+classes] straight from the Concat; else a Reshape makes it
            [N, 1, 4+classes].
        boxes_output: the boxes (in pixels) are also a second graph output, `boxes`.
        seed: seeds the weights.
    """
    rng = np.random.default_rng(seed)
    width = 4 + classes
    outputs = f"float[N,{width}] output" if flat else f"float[N,1,{width}] output"
    if boxes_output:
        outputs += ", float[N,4] boxes"
    joined = "output" if flat else "joined"
    reshape = "" if flat else "output = Reshape (joined, shape)"
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        detector_head (float[N,{features}] input) => ({outputs}) {{
            hidden = MatMul (input, w_in)
            act = Relu (hidden)
            box_logits = MatMul (act, w_box)
            box_unit = Sigmoid (box_logits)
            boxes = Mul (box_unit, image_size)
            score_logits = MatMul (act, w_score)
            scores = Sigmoid (score_logits)
            {joined} = Concat <axis = 1> (boxes, scores)
            {reshape}
        }}
    """
    initializers = {
        "w_in": random_weights(rng, features, hidden, scale=0.4),
        "w_box": random_weights(rng, hidden, 4, scale=0.3),
        "w_score": random_weights(rng, hidden, classes, scale=0.6),
        "image_size": np.array(640.0, np.float32),
    }
    if score_weights is not None:
        initializers["w_score"] = np.asarray(score_weights, np.float32)
    if not flat:
        initializers["shape"] = np.array([-1, 1, width], np.int64)
    return checked_model(text, initializers)
