"""Graphs at the edges of what a quantizer handles: no float tensor, outputs no op reads."""

from __future__ import annotations

import numpy as np
import onnx

from qconvert.testing._build import checked_model, random_weights


def integer_only(*, opset: int = 17) -> onnx.ModelProto:
    """A model with no float tensor at all: int64 input -> Add -> int64 output."""
    text = f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        integer_only (int64[N,4] input) => (int64[N,4] output) {{
            output = Add (input, offset)
        }}
    """
    return checked_model(text, {"offset": np.arange(4, dtype=np.int64)})


def conv_and_matmul_outputs(*, seed: int = 0) -> onnx.ModelProto:
    """A Conv and a MatMul that each write a graph output (no op reads them afterwards)."""
    rng = np.random.default_rng(seed)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        conv_and_matmul_outputs (float[N,3,8,8] input, float[N,16] vector)
            => (float[N,4,8,8] feature, float[N,8] projection) {
            feature = Conv <pads = [1,1,1,1]> (input, w, b)
            projection = MatMul (vector, m)
        }
    """
    return checked_model(
        text,
        {
            "w": random_weights(rng, 4, 3, 3, 3),
            "b": random_weights(rng, 4, scale=0.1),
            "m": random_weights(rng, 16, 8),
        },
    )
