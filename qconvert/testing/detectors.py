"""Detector heads: outputs that join tensors of very different ranges."""

from __future__ import annotations

import numpy as np
import onnx

from qconvert.testing._build import checked_model, random_weights


def detector_head(features: int = 16, classes: int = 4, *, seed: int = 0) -> onnx.ModelProto:
    """A detector's head: box coordinates in pixels (0..640) beside class scores (0..1).

    Both go into one tensor, as YOLO-style exporters write it: input [N,F] -> output
    [N,1,4+classes].
    """
    rng = np.random.default_rng(seed)
    width = 4 + classes
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        detector_head (float[N,{features}] input) => (float[N,1,{width}] output) {{
            hidden = MatMul (input, w_in)
            act = Relu (hidden)
            box_logits = MatMul (act, w_box)
            box_unit = Sigmoid (box_logits)
            boxes = Mul (box_unit, image_size)
            score_logits = MatMul (act, w_score)
            scores = Sigmoid (score_logits)
            joined = Concat <axis = 1> (boxes, scores)
            output = Reshape (joined, shape)
        }}
    """
    return checked_model(
        text,
        {
            "w_in": random_weights(rng, features, 32, scale=0.4),
            "w_box": random_weights(rng, 32, 4, scale=0.3),
            "w_score": random_weights(rng, 32, classes, scale=0.6),
            "image_size": np.array(640.0, np.float32),
            "shape": np.array([-1, 1, width], np.int64),
        },
    )
