"""Cross-layer equalization rescales weights in float64 without float64 copies of them.

`equalize._rescaled` works a block of output channels at a time; the values are those of
the whole-weight formula, bit for bit, and the pass holds far less than the float64
copies and products it made per pair and sweep.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx_ir as ir
import pytest

from qconvert.owned_tensors import own_tensors
from qconvert.passes.equalize import EqualizePass, _rescaled
from qconvert.testing._build import checked_model, random_weights


@pytest.mark.parametrize(
    ("shape", "factor_shape"),
    [
        ((512, 256, 3, 3), (-1, 1, 1, 1)),  # the first Conv's output channels
        ((256, 512, 3, 3), (1, -1, 1, 1)),  # the second's input channels
        ((96, 1, 3, 3), (-1, 1, 1, 1)),  # depthwise
    ],
)
def test_blocks_give_the_whole_formula_bit_for_bit(shape, factor_shape):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal(shape).astype(np.float32)
    count = shape[0] if factor_shape[0] == -1 else shape[1]
    factor = np.sqrt(rng.random(count) + 0.1).reshape(factor_shape)
    for divide in (True, False):
        wide = weight.astype(np.float64)
        whole = (wide / factor if divide else wide * factor).astype(np.float32)
        assert _rescaled(weight, factor, divide=divide).tobytes() == whole.tobytes()


def _wide_pair() -> ir.Model:
    """Conv (512 x 256 x 3 x 3: 4.7 MB) -> Relu -> Conv (256 x 512 x 3 x 3)."""
    rng = np.random.default_rng(1)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        pair (float[1,256,4,4] input) => (float[1,256,4,4] out) {
            a = Conv <pads = [1,1,1,1], kernel_shape = [3,3]> (input, wa, ba)
            relu = Relu (a)
            out = Conv <pads = [1,1,1,1], kernel_shape = [3,3]> (relu, wb, bb)
        }
    """
    scales = np.exp(rng.standard_normal((512, 1, 1, 1))).astype(np.float32)
    proto = checked_model(
        text,
        {
            "wa": random_weights(rng, 512, 256, 3, 3) * scales,
            "ba": random_weights(rng, 512, scale=0.1),
            "wb": random_weights(rng, 256, 512, 3, 3),
            "bb": random_weights(rng, 256, scale=0.1),
        },
    )
    model = ir.serde.deserialize_model(proto)
    own_tensors(model)  # as a loaded model: each weight one array, read without a copy
    return model


def test_the_pass_holds_no_float64_copy_of_a_weight():
    model = _wide_pair()
    weight_bytes = model.graph.initializers["wa"].const_value.nbytes
    tracemalloc.start()
    try:
        equalize = EqualizePass()
        equalize(model)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert equalize.pairs
    # The rescaled weights of the sweep before and of this one, |w| and a block: 4.9
    # weights' bytes. With whole-weight float64 copies and products it was 9.0.
    assert peak < 6 * weight_bytes, peak / weight_bytes
