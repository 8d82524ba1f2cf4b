"""A model's cheap first Conv on its float input computes in float before quantized Convs.

A model's first Conv on its image (3x3 on three colour channels, or one grey channel) does
9 to 27 multiply-accumulates per output: onnxruntime's float kernel reads it straight
from the NCHW input, while its integer kernel unfolds it into a short matrix product.
Planned float, from int8-stored weights, the int8 boundary moves to its output. Checked
against the same model with the stem kept quantized by an override file, on outputs run
in onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from qconvert import testing

CHANNELS, WIDE, SIZE = 3, 32, 16
STEM = "first Conv on the model's float input, with few multiply-accumulates per output"


def _model(stem_kernel: int = 3, pool: bool = False, silu: bool = False) -> onnx.ModelProto:
    """stem (CHANNELS -> WIDE) -> Clip (or SiLU) -> [MaxPool] -> depthwise 3x3 -> Clip ->
    pointwise 1x1 (WIDE -> 16) -> Relu -> 3x3 (16 -> 8)."""
    rng = np.random.default_rng(0)
    pad = stem_kernel // 2
    size = SIZE // 2 if pool else SIZE
    nodes = [
        h.make_node("Conv", ["input", "stem_w", "stem_b"], ["s"], name="stem", pads=[pad] * 4),
    ]
    if silu:
        nodes += [
            h.make_node("Sigmoid", ["s"], ["sg"], name="stem_gate"),
            h.make_node("Mul", ["s", "sg"], ["sc"], name="stem_act"),
        ]
    else:
        nodes.append(h.make_node("Clip", ["s", "lo", "hi"], ["sc"], name="stem_act"))
    source = "sc"
    if pool:
        nodes.append(
            h.make_node(
                "MaxPool", ["sc"], ["sp"], name="pool", kernel_shape=[2, 2], strides=[2, 2]
            )
        )
        source = "sp"
    nodes += [
        h.make_node(
            "Conv", [source, "dw_w", "dw_b"], ["d"], name="dw", group=WIDE, pads=[1] * 4
        ),
        h.make_node("Clip", ["d", "lo", "hi"], ["dc"], name="dw_act"),
        h.make_node("Conv", ["dc", "pw_w", "pw_b"], ["p"], name="pw"),
        h.make_node("Relu", ["p"], ["pr"], name="pw_act"),
        h.make_node("Conv", ["pr", "head_w", "head_b"], ["output"], name="head", pads=[1] * 4),
    ]
    fan_in = CHANNELS * stem_kernel * stem_kernel
    inits = {
        "stem_w": rng.standard_normal((WIDE, CHANNELS, stem_kernel, stem_kernel))
        / np.sqrt(fan_in),
        "stem_b": rng.standard_normal(WIDE) * 0.1 + 0.5,
        "dw_w": rng.standard_normal((WIDE, 1, 3, 3)) * 0.3,
        "dw_b": rng.standard_normal(WIDE) * 0.1 + 0.3,
        "pw_w": rng.standard_normal((16, WIDE, 1, 1)) * 0.2,
        "pw_b": rng.standard_normal(16) * 0.1,
        "head_w": rng.standard_normal((8, 16, 3, 3)) * 0.1,
        "head_b": np.zeros(8),
        "lo": np.array(0.0),
        "hi": np.array(6.0),
    }
    graph = h.make_graph(
        nodes,
        "stem",
        [h.make_tensor_value_info("input", TensorProto.FLOAT, ["N", CHANNELS, SIZE, SIZE])],
        [h.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 8, size, size])],
        [nh.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _samples(count: int) -> list[dict]:
    rng = np.random.default_rng(1)
    return [
        {"input": rng.uniform(-1.0, 1.0, (1, CHANNELS, SIZE, SIZE)).astype(np.float32)}
        for _ in range(count)
    ]


def _quantize(model, tmp_path, name, overrides=None):
    return testing.quantize_fast(model, tmp_path, name, _samples(16), overrides)


def test_a_cheap_conv_on_the_float_input_computes_in_float_before_quantized_convs(tmp_path):
    path, out, floats, report = _quantize(_model(), tmp_path, "stem")
    assert STEM in floats["stem"] and "int8-stored weights" in floats["stem"], floats
    # The depthwise Conv reads a float op's output, not the model's input, and writes no
    # more values than it reads: it stays quantized, as the rest of the chain.
    assert "dw" not in floats and "pw" not in floats and "head" not in floats, floats

    written = onnx.load_model(str(out))
    producers = {o: n for n in written.graph.node for o in n.output}
    stem = next(n for n in written.graph.node if n.name == "stem")
    assert stem.input[0] == "input"  # reads the float input, no QuantizeLinear before it
    assert producers[stem.input[1]].op_type in {"DequantizeLinear", "Mul"}  # int8-stored
    dw = next(n for n in written.graph.node if n.name == "dw")
    assert producers[dw.input[0]].op_type == "DequantizeLinear"  # the boundary moved here
    assert producers[producers[dw.input[0]].input[0]].input[0] == "sc"  # Q of the Clip

    # The head Conv writes the graph output without a QuantizeLinear: onnxruntime runs it
    # in float on its dequantized input, with or without the rule.
    optimized = testing.optimized_ops(out, tmp_path)
    assert optimized["QLinearConv"] == 2 and optimized["Conv"] == 2, optimized
    assert report.conversion.fusion_audit is not None
    assert not report.conversion.fusion_audit.unplanned

    # Against the same model with the stem kept quantized: the rounding of the input and
    # the stem's int8 weights' error in the stem are gone, that of its clipped output stays.
    _, kept, kept_floats, _ = _quantize(
        _model(), tmp_path, "kept", overrides='[nodes]\n"stem" = "int8"\n'
    )
    assert "stem" not in kept_floats, kept_floats
    assert testing.optimized_ops(kept, tmp_path)["QLinearConv"] == 3  # stem, dw, pw
    samples = _samples(8)
    ours = testing.output_sqnr(path, out, samples)
    quantized = testing.output_sqnr(path, kept, samples)
    assert ours > 25.0 and ours >= quantized - 0.5, (ours, quantized)


def test_a_stem_before_a_silu_computes_in_float_with_it(tmp_path):
    """SiLU (Sigmoid and Mul) between the stem and its Convs computes in float too.

    onnxruntime fuses the pair into one QuickGelu on the float Conv's output; quantized,
    the stem would run as an integer kernel on the rounded image, and the SiLU as
    QLinearSigmoid and QLinearMul.
    """
    path, out, floats, report = _quantize(_model(silu=True), tmp_path, "silu")
    assert STEM in floats["stem"], floats
    assert {"stem_gate", "stem_act"} <= floats.keys(), floats
    assert "dw" not in floats and "pw" not in floats and "head" not in floats, floats

    written = onnx.load_model(str(out))
    producers = {o: n for n in written.graph.node for o in n.output}
    stem = next(n for n in written.graph.node if n.name == "stem")
    assert stem.input[0] == "input"
    dw = next(n for n in written.graph.node if n.name == "dw")
    assert producers[producers[dw.input[0]].input[0]].input[0] == "sc"  # Q of the Mul
    optimized = testing.optimized_ops(out, tmp_path)
    assert optimized["QuickGelu"] == 1 and optimized["QLinearSigmoid"] == 0, optimized
    assert optimized["QLinearConv"] == 2 and optimized["Conv"] == 2, optimized
    assert not report.conversion.fusion_audit.unplanned

    # Against the stem and its SiLU kept quantized by the override file.
    _, kept, kept_floats, _ = _quantize(
        _model(silu=True),
        tmp_path,
        "silu_kept",
        overrides='[nodes]\n"stem" = "int8"\n',
    )
    assert "stem" not in kept_floats and "stem_act" not in kept_floats, kept_floats
    assert testing.optimized_ops(kept, tmp_path)["QLinearSigmoid"] == 1
    samples = _samples(8)
    ours = testing.output_sqnr(path, out, samples)
    quantized = testing.output_sqnr(path, kept, samples)
    assert ours > 25.0 and ours >= quantized - 0.5, (ours, quantized)


def test_a_stem_before_a_silu_read_by_a_pool_stays_quantized(tmp_path):
    _, out, floats, _ = _quantize(_model(pool=True, silu=True), tmp_path, "silu_pooled")
    assert "stem" not in floats, floats
    assert testing.optimized_ops(out, tmp_path)["QLinearConv"] == 3


def test_a_stem_with_much_arithmetic_stays_quantized(tmp_path):
    """A 7x7 Conv on 3 channels does 147 multiply-accumulates per output: int8 pays."""
    _, out, floats, _ = _quantize(_model(stem_kernel=7), tmp_path, "wide_kernel")
    assert "stem" not in floats, floats
    assert testing.optimized_ops(out, tmp_path)["QLinearConv"] == 3


def test_a_stem_read_by_a_pool_stays_quantized(tmp_path):
    """A MaxPool would take the QuantizeLinear before it and run on uint8 NCHW values."""
    _, out, floats, _ = _quantize(_model(pool=True), tmp_path, "pooled")
    assert "stem" not in floats, floats
    assert testing.optimized_ops(out, tmp_path)["QLinearConv"] == 3
