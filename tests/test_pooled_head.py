"""A small head after a global average pooling reads the feature map (`FoldPoolIntoHeadPass`).

GlobalAveragePool -> Flatten -> Gemm becomes Transpose (NHWC) -> Reshape -> Gemm with the
weight repeated over the positions and divided by their count: the same numbers in float,
and in int8 one QGemm reading the last Conv's uint8 map, with a float output.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qconvert import testing
from qconvert.passes.pooled_head import MAX_FOLDED_WEIGHTS, FoldPoolIntoHeadPass
from qconvert.passes.prepare import prepare
from qconvert.runtime import make_session


def _head_model(
    *, head: str = "Gemm <transB = 1>", size: str = "4,4", classes: int = 10, c: int = 32
) -> onnx.ModelProto:
    """Conv 3x3 -> Relu -> GlobalAveragePool -> Flatten -> head; input [N, 8, H, W]."""
    rng = np.random.default_rng(0)
    height, width = size.split(",")
    by_rows = "transB = 1" in head
    weight = rng.standard_normal((classes, c) if by_rows else (c, classes)) * 0.3
    product = f"logits = {head} (flat, fc_w, fc_b)"
    if head == "MatMul":
        product = "m = MatMul (flat, fc_w)\n            logits = Add (m, fc_b)"
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        pooled_head (float[N,8,{height},{width}] input) => (float[N,{classes}] logits) {{
            h = Conv <pads = [1,1,1,1], kernel_shape = [3,3]> (input, conv_w, conv_b)
            r = Relu (h)
            p = GlobalAveragePool (r)
            flat = Flatten (p)
            {product}
        }}
    """
    model = onnx.parser.parse_model(text)
    inits = {
        "conv_w": rng.standard_normal((c, 8, 3, 3)) * 0.3,
        "conv_b": rng.standard_normal(c) * 0.1,
        "fc_w": weight,
        "fc_b": rng.standard_normal(classes) * 0.1,
    }
    model.graph.initializer.extend(
        onnx.numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def _samples(model: onnx.ModelProto, count: int = 8) -> list[dict[str, np.ndarray]]:
    return [testing.random_inputs(model, seed=i) for i in range(count)]


@pytest.mark.parametrize("head", ["Gemm <transB = 1>", "Gemm", "MatMul"])
def test_the_folded_head_computes_the_same_numbers_in_float(head):
    model = _head_model(head=head)
    prepared = prepare(ir.serde.deserialize_model(model), min_opset=13)
    ops = testing.count_ops(ir.serde.serialize_model(prepared))
    assert ops["GlobalAveragePool"] == 0 and ops["Flatten"] == 0, ops
    assert ops["Transpose"] == 1 and ops["Reshape"] == 1, ops
    before = make_session(model.SerializeToString())
    after = make_session(ir.serde.serialize_model(prepared).SerializeToString())
    for sample in _samples(model, 4):
        np.testing.assert_allclose(
            after.run(None, sample)[0], before.run(None, sample)[0], rtol=1e-5, atol=1e-5
        )


def test_the_int8_head_runs_as_one_qgemm_on_the_uint8_map(tmp_path):
    model = _head_model()
    samples = _samples(model, 16)
    path, out, _, _ = testing.quantize_fast(model, tmp_path, "head", samples)
    optimized = testing.optimized_ops(out, tmp_path)
    # No layout change out of the integer chain, no DequantizeLinear of the map, no pooling.
    assert optimized["QGemm"] == 1 and optimized["QLinearConv"] == 1, optimized
    for gone in ("GlobalAveragePool", "DequantizeLinear", "Gemm"):
        assert optimized[gone] == 0, optimized
    assert optimized["Transpose"] == 1, optimized  # into the chain at the input only
    assert testing.output_sqnr(path, out, samples[:8]) > 30.0


def test_a_head_of_unknown_map_size_or_too_many_folded_weights_is_left_alone():
    for model in (
        _head_model(size="H,W"),  # positions unknown
        _head_model(size="16,16", classes=10, c=32),  # 10 x 32 x 256 folded weights
    ):
        assert FoldPoolIntoHeadPass()(ir.serde.deserialize_model(model)).modified is False
    assert 10 * 32 * 256 > MAX_FOLDED_WEIGHTS


def test_a_pooled_feature_with_another_reader_is_left_alone():
    model = _head_model()
    pooled = onnx.helper.make_tensor_value_info("p", onnx.TensorProto.FLOAT, None)
    model.graph.output.append(pooled)
    assert FoldPoolIntoHeadPass()(ir.serde.deserialize_model(model)).modified is False
