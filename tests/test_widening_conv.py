"""A cheap widening Conv from the int8 chain into float ops computes in float.

MobileNetV3's block: a pointwise Conv widens the chain's tensor, a HardSwish (float: no
integer kernel) and a depthwise Conv left float follow. Quantized, the wide Conv output is
written as uint8 only to be dequantized at once; in float, reading its input's
DequantizeLinear, the conversion sits on the narrow input and onnxruntime fuses the Conv
with the HardSwish. Checked against the same model with the Conv kept quantized by an
override file: one rounding fewer, so the output is as close to float or closer, and the
optimized graph holds no HardSigmoid.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from qconvert import testing

NARROW, WIDE = 8, 32
WIDENING = "writes at least as many values as it reads"


def _model(expand_kernel: int = 1, wide: int = WIDE) -> onnx.ModelProto:
    """stem 1x1 -> Relu -> expand (widens) -> HardSwish -> depthwise 5x5 -> HardSwish ->
    project 1x1 back to NARROW channels."""
    rng = np.random.default_rng(0)
    pad = expand_kernel // 2
    nodes = [
        h.make_node("Conv", ["input", "stem_w", "stem_b"], ["s"], name="stem"),
        h.make_node("Relu", ["s"], ["sr"], name="stem_relu"),
        h.make_node(
            "Conv", ["sr", "expand_w", "expand_b"], ["e"], name="expand", pads=[pad] * 4
        ),
        h.make_node("HardSwish", ["e"], ["eh"], name="expand_act"),
        h.make_node(
            "Conv", ["eh", "dw_w", "dw_b"], ["d"], name="dw", group=wide, pads=[2] * 4
        ),
        h.make_node("HardSwish", ["d"], ["dh"], name="dw_act"),
        h.make_node("Conv", ["dh", "project_w", "project_b"], ["output"], name="project"),
    ]
    inits = {
        "stem_w": rng.standard_normal((NARROW, NARROW, 1, 1)) * 0.4,
        "stem_b": rng.standard_normal(NARROW) * 0.1,
        "expand_w": rng.standard_normal((wide, NARROW, expand_kernel, expand_kernel)) * 0.4,
        "expand_b": rng.standard_normal(wide) * 0.1,
        "dw_w": rng.standard_normal((wide, 1, 5, 5)) * 0.2,
        "dw_b": rng.standard_normal(wide) * 0.1,
        "project_w": rng.standard_normal((NARROW, wide, 1, 1)) * 0.2,
        "project_b": np.zeros(NARROW),
    }
    graph = h.make_graph(
        nodes,
        "widening",
        [h.make_tensor_value_info("input", TensorProto.FLOAT, ["N", NARROW, 12, 12])],
        [h.make_tensor_value_info("output", TensorProto.FLOAT, ["N", NARROW, 12, 12])],
        [nh.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _samples(count: int) -> list[dict]:
    rng = np.random.default_rng(1)
    return [
        {"input": rng.standard_normal((1, NARROW, 12, 12)).astype(np.float32)}
        for _ in range(count)
    ]


def _quantize(model, tmp_path, name, overrides=None):
    return testing.quantize_fast(model, tmp_path, name, _samples(16), overrides)


def test_a_widening_conv_into_float_ops_computes_in_float_from_its_dequantized_input(
    tmp_path,
):
    path, out, floats, report = _quantize(_model(), tmp_path, "widening")
    assert WIDENING in floats["expand"] and "int8-stored weights" in floats["expand"]
    assert "stem" not in floats and "project" not in floats, floats

    written = onnx.load_model(str(out))
    producers = {o: n for n in written.graph.node for o in n.output}
    expand = next(n for n in written.graph.node if n.name == "expand")
    assert producers[expand.input[0]].op_type == "DequantizeLinear"  # the narrow input
    weight = producers[producers[expand.input[1]].input[0]]  # Mul(Cast(W_q), scale)
    assert weight.op_type == "Cast"

    # onnxruntime fuses the float Conv with its HardSwish: no HardSigmoid + Mul left, and
    # the stem still runs as an integer kernel (the project Conv, writing the graph output
    # without a QuantizeLinear, runs in float on its dequantized input either way).
    optimized = testing.optimized_ops(out, tmp_path)
    assert optimized["HardSigmoid"] == 0 and optimized["QLinearConv"] == 1, optimized
    assert report.conversion.fusion_audit is not None
    assert not report.conversion.fusion_audit.unplanned

    # Against the same model with the Conv kept quantized: one rounding fewer.
    _, kept, kept_floats, _ = _quantize(
        _model(), tmp_path, "kept", overrides='[nodes]\n"expand" = "int8"\n'
    )
    assert "expand" not in kept_floats, kept_floats
    kept_ops = testing.optimized_ops(kept, tmp_path)
    assert kept_ops["QLinearConv"] == 2 and kept_ops["HardSigmoid"] == 1, kept_ops
    samples = _samples(8)
    ours = testing.output_sqnr(path, out, samples)
    quantized = testing.output_sqnr(path, kept, samples)
    assert ours > 25.0 and ours >= quantized - 0.1, (ours, quantized)


def test_a_narrowing_conv_into_float_ops_stays_quantized(tmp_path):
    """Fewer values out than in: the boundary is already on the narrower tensor."""
    _, out, floats, _ = _quantize(_model(wide=4), tmp_path, "narrowing")
    assert "expand" not in floats, floats
    assert testing.optimized_ops(out, tmp_path)["QLinearConv"] == 2


def test_a_widening_conv_with_much_arithmetic_stays_quantized(tmp_path):
    """A 3x3 Conv on 8 channels does 72 multiply-accumulates per output: int8 pays."""
    _, _, floats, _ = _quantize(_model(expand_kernel=3), tmp_path, "dense")
    assert "expand" not in floats, floats
