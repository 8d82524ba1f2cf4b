"""A layer with dead output channels still lands on its integer kernel.

Weight decay leaves some channels of a trained layer dead: weights and bias of about
1e-39, denormal float32 (4 Convs of PP-OCRv4's recognizer have 1 to 16 of them). Their
weights round to 0 at any scale, and the bias fit gave them the smallest normal weight
scale, 1.2e-38. Input scale x that scale then fell below the smallest normal float32, so
the int32 bias was stored at scale 1.0 there; onnxruntime fuses DQ -> Conv -> Q into
QLinearConv (and Gemm into QGemm) only when the bias scale is input scale x weight scale,
so the layer ran in float between its Q/DQ nodes: an island the plan did not mean.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper as h
from onnx import numpy_helper as nh
from test_float_reader_islands import _save_with_samples

from qconvert import qparams, testing

C = 16
DEAD = (0, 5, 9)
SAMPLES = 32


def _layer(op: str, rng, index: int, dead: bool) -> tuple[list, list]:
    """One Conv (1x1, C channels) or Gemm (C x C), its dead channels set when `dead`."""
    shape = (C, C, 1, 1) if op == "Conv" else (C, C)
    weight = rng.standard_normal(shape) * np.sqrt(2.0 / C)
    bias = rng.standard_normal(C) * 0.1
    weight, bias = weight.astype(np.float32), bias.astype(np.float32)
    if dead:
        for channel in DEAD:
            # Denormal, as a trained model stores them: sign and size vary.
            weight[channel] = np.float32(3e-39) * np.sign(weight[channel])
            bias[channel] = np.float32(-9e-40)
    inits = [nh.from_array(weight, f"w{index}"), nh.from_array(bias, f"b{index}")]
    attributes = {"transB": 1} if op == "Gemm" else {}
    return inits, attributes


def _model(op: str, tmp_path):
    """layer1 -> Relu -> layer2 (dead channels) -> Relu -> layer3 -> output."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "input"
    for i in (1, 2, 3):
        layer_inits, attributes = _layer(op, rng, i, dead=i == 2)
        inits += layer_inits
        out = "output" if i == 3 else f"y{i}"
        nodes.append(
            h.make_node(op, [x, f"w{i}", f"b{i}"], [out], name=f"layer{i}", **attributes)
        )
        if i < 3:
            nodes.append(h.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    shape = [1, C, 6, 6] if op == "Conv" else [4, C]
    return _save_with_samples(nodes, inits, "dead_channels", shape, tmp_path, SAMPLES)


# The last Conv writes the graph output without a QuantizeLinear: a float Conv on its
# DequantizeLinear inputs, as planned; QGemm writes float output itself.
@pytest.mark.parametrize(
    ("op", "kernel", "kernels"), [("Conv", "QLinearConv", 2), ("Gemm", "QGemm", 3)]
)
def test_a_layer_with_dead_channels_is_an_integer_kernel(
    op, kernel, kernels, tmp_path, run_cli
):
    path = _model(op, tmp_path)
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    result = run_cli(
        "quantize", path, "--data", tmp_path / "calib", "-o", out, "--report", report,
        "--recipe", "fast", "--strict-kernels",
    )  # fmt: skip
    assert result.code == 0, result.err
    audit = json.loads(report.read_text())["conversion"]["fusion_audit"]
    assert audit["unplanned_islands"] == 0, audit
    assert audit["integer_kernels"].get(kernel, 0) == kernels, audit
    assert testing.optimized_ops(out, tmp_path)[kernel] == kernels
    feeds = [testing.random_inputs(onnx.load(path), seed=100 + i) for i in range(8)]
    assert testing.output_sqnr(path, out, feeds) > 25.0


def test_a_dead_channel_keeps_its_bias_scale_the_product_of_the_two_scales():
    weights = np.array([[3e-39, -3e-39], [1.27, 0.0]], np.float32)
    weight = qparams.weight_qparams(weights, np.int8, axis=0)
    input_scale = np.float32(0.02)
    fitted = qparams.fit_weight_scale_to_bias(
        weight, weights, input_scale, np.float32([-9e-40, 0.2])
    )
    tiny = np.finfo(np.float32).tiny
    product = input_scale * fitted.scale
    # The smallest weight scale with a normal product: one step less would be denormal.
    assert product[0] >= tiny
    assert input_scale * np.nextafter(fitted.scale[0], np.float32(0)) < tiny
    assert fitted.scale[1] == np.float32(0.01)  # a real channel keeps its scale
    bias = qparams.bias_qparams(input_scale, fitted.scale)
    np.testing.assert_array_equal(bias.scale, product)
    np.testing.assert_array_equal(qparams.quantize(weights, fitted)[0], [0, 0])
