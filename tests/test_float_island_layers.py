"""A ConvTranspose that no integer kernel reads computes in float, its output float.

onnxruntime has no integer ConvTranspose on CPU: a quantized one runs as DequantizeLinear
-> float ConvTranspose -> QuantizeLinear. Where float ops, another ConvTranspose or a
graph output read it (a segmentation head's two upsampling layers before a Sigmoid), the
QuantizeLinear only rounds the widest tensor of the model to be dequantized at once.
Checked against the same model with both layers kept quantized by an override file.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from qconvert import testing

CHANNELS, SIZE = 16, 8
ISLAND = "onnxruntime has no integer ConvTranspose on CPU, and no integer kernel reads"


def _model(conv_after: bool = False) -> onnx.ModelProto:
    """Conv 3x3 (16 -> 16) -> Relu -> ConvTranspose 2x2/2 (16 -> 8) -> Relu ->
    ConvTranspose 2x2/2 (8 -> 1) -> Sigmoid, or, with `conv_after`, Conv 3x3 (8 -> 4)
    after the first ConvTranspose's Relu."""
    rng = np.random.default_rng(0)
    nodes = [
        h.make_node("Conv", ["input", "conv_w", "conv_b"], ["c"], name="conv", pads=[1] * 4),
        h.make_node("Relu", ["c"], ["cr"], name="conv_act"),
        h.make_node(
            "ConvTranspose", ["cr", "up0_w", "up0_b"], ["u"], name="up0", strides=[2, 2]
        ),
        h.make_node("Relu", ["u"], ["ur"], name="up0_act"),
    ]
    inits = {
        "conv_w": rng.standard_normal((16, CHANNELS, 3, 3)) * 0.2,
        "conv_b": rng.standard_normal(16) * 0.1,
        "up0_w": rng.standard_normal((16, 8, 2, 2)) * 0.25,
        "up0_b": rng.standard_normal(8) * 0.1,
    }
    if conv_after:
        nodes.append(
            h.make_node(
                "Conv", ["ur", "tail_w", "tail_b"], ["output"], name="tail", pads=[1] * 4
            )
        )
        inits |= {
            "tail_w": rng.standard_normal((4, 8, 3, 3)) * 0.2,
            "tail_b": np.zeros(4),
        }
        out_shape = ["N", 4, 2 * SIZE, 2 * SIZE]
    else:
        nodes += [
            h.make_node(
                "ConvTranspose", ["ur", "up1_w", "up1_b"], ["v"], name="up1", strides=[2, 2]
            ),
            h.make_node("Sigmoid", ["v"], ["output"], name="prob"),
        ]
        inits |= {"up1_w": rng.standard_normal((8, 1, 2, 2)) * 0.4, "up1_b": np.zeros(1)}
        out_shape = ["N", 1, 4 * SIZE, 4 * SIZE]
    graph = h.make_graph(
        nodes,
        "upsampling_head",
        [h.make_tensor_value_info("input", TensorProto.FLOAT, ["N", CHANNELS, SIZE, SIZE])],
        [h.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)],
        [nh.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _samples(count: int) -> list[dict]:
    rng = np.random.default_rng(1)
    return [
        {"input": rng.standard_normal((1, CHANNELS, SIZE, SIZE)).astype(np.float32)}
        for _ in range(count)
    ]


def _quantize(model, tmp_path, name, overrides=None):
    return testing.quantize_fast(model, tmp_path, name, _samples(16), overrides)


def test_conv_transposes_that_no_integer_kernel_reads_compute_in_float(tmp_path):
    path, out, floats, report = _quantize(_model(), tmp_path, "head")
    assert ISLAND in floats["up0"] and ISLAND in floats["up1"], floats
    assert "int8-stored weights" in floats["up0"], floats
    assert "conv" not in floats, floats

    written = onnx.load_model(str(out))
    producers = {o: n for n in written.graph.node for o in n.output}
    readers = {}
    for node in written.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    up0 = next(n for n in written.graph.node if n.name == "up0")
    assert producers[up0.input[0]].op_type == "DequantizeLinear"  # the Conv's int8 output
    up1 = next(n for n in written.graph.node if n.name == "up1")
    assert "QuantizeLinear" not in readers[up0.output[0]] + readers[up1.output[0]], readers
    counts = testing.count_ops(out)
    assert counts["QuantizeLinear"] == 2, counts  # the input and the Conv's output

    assert report.conversion.fusion_audit is not None
    assert not report.conversion.fusion_audit.unplanned

    # Against the same head with both kept quantized: two roundings fewer.
    _, kept, kept_floats, _ = _quantize(
        _model(), tmp_path, "kept", overrides='[nodes]\n"up0" = "int8"\n"up1" = "int8"\n'
    )
    assert "up0" not in kept_floats and "up1" not in kept_floats, kept_floats
    assert testing.count_ops(kept)["QuantizeLinear"] == 4
    samples = _samples(8)
    ours = testing.output_sqnr(path, out, samples)
    quantized = testing.output_sqnr(path, kept, samples)
    assert ours > 25.0 and ours >= quantized - 0.1, (ours, quantized)


def test_a_conv_transpose_an_integer_conv_reads_stays_quantized(tmp_path):
    """Its QuantizeLinear feeds the integer Conv after it: the island pays for itself."""
    _, out, floats, _ = _quantize(_model(conv_after=True), tmp_path, "tail")
    assert "up0" not in floats, floats
    assert testing.optimized_ops(out, tmp_path)["QLinearConv"] == 1  # conv; tail writes out
    written = onnx.load_model(str(out))
    up0 = next(n for n in written.graph.node if n.name == "up0")
    readers = [n.op_type for n in written.graph.node if up0.output[0] in n.input]
    # Relu folded into the output's quantization: the QuantizeLinear reads up0 itself.
    assert readers == ["QuantizeLinear"], readers
