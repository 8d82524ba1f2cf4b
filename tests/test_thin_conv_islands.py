"""Thin Convs between float ops compute in float, from int8-stored weights.

A depthwise Conv between two HardSwish activations (MobileNetV3's blocks) would run as an
int8 island: QuantizeLinear, onnxruntime's NHWC integer kernel with a Transpose on each
side, DequantizeLinear. The planner keeps it float; its weights are still stored as int8,
read through Mul(Cast(W_q), scale), which onnxruntime folds into a float initializer when
it loads the model, so the Conv keeps its fast float kernel.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

import qconvert
from qconvert import testing
from qconvert.runtime import make_session

C = 16
ISLAND = "thin Conv between float ops"


def _model(nodes, inits) -> onnx.ModelProto:
    graph = h.make_graph(
        nodes,
        "islands",
        [h.make_tensor_value_info("input", TensorProto.FLOAT, ["N", C, 8, 8])],
        [h.make_tensor_value_info("output", TensorProto.FLOAT, ["N", C, 8, 8])],
        [nh.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _depthwise(name: str, x: str, out: str, kernel: int) -> onnx.NodeProto:
    pad = kernel // 2
    return h.make_node(
        "Conv", [x, f"{name}_w", f"{name}_b"], [out], name=name, group=C, pads=[pad] * 4
    )


def _pointwise(name: str, x: str, out: str) -> onnx.NodeProto:
    return h.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [out], name=name)


def _weights(rng, kernel: int) -> dict[str, np.ndarray]:
    # Channels of very different magnitudes: per-channel scales matter.
    gains = np.geomspace(0.05, 2.0, C).reshape(C, 1, 1, 1)
    return {
        "dw_w": rng.standard_normal((C, 1, kernel, kernel)) * gains,
        "dw_b": rng.standard_normal(C) * 0.1,
    }


def _samples(count: int) -> list[dict]:
    rng = np.random.default_rng(1)
    return [
        {"input": rng.standard_normal((1, C, 8, 8)).astype(np.float32) * 2}
        for _ in range(count)
    ]


def _quantize(model, tmp_path, samples):
    path = testing.save(model, tmp_path / "model.onnx")
    calib = testing.write_samples(tmp_path / "calib", samples)
    out = tmp_path / "model.int8.onnx"
    report = qconvert.quantize(path, out, data=calib)
    floats = {node.name: node.reason for node in report.conversion.float_nodes}
    return path, out, floats


def test_a_depthwise_conv_between_float_ops_computes_in_float_from_int8_weights(tmp_path):
    rng = np.random.default_rng(0)
    model = _model(
        [
            h.make_node("HardSwish", ["input"], ["a"], name="act_in"),
            _depthwise("dw", "a", "d", kernel=5),
            h.make_node("HardSwish", ["d"], ["output"], name="act_out"),
        ],
        _weights(rng, 5),
    )
    samples = _samples(16)
    path, out, floats = _quantize(model, tmp_path, samples)
    assert ISLAND in floats["dw"] and "int8-stored weights" in floats["dw"], floats

    quantized = onnx.load_model(str(out))
    inits = {t.name: nh.to_array(t) for t in quantized.graph.initializer}
    ops = testing.count_ops(quantized)
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 0, ops
    assert ops["Cast"] == 1 and ops["Mul"] == 1, ops
    producers = {o: n for n in quantized.graph.node for o in n.output}
    multiply = producers[next(n for n in quantized.graph.node if n.name == "dw").input[1]]
    cast = producers[multiply.input[0]]
    integers, scale = inits[cast.input[0]], inits[multiply.input[1]]
    assert integers.dtype == np.int8 and integers.shape == (C, 1, 5, 5)
    assert scale.shape == (C, 1, 1, 1)  # one scale per output channel
    assert not any(a.dtype == np.float32 and a.size >= C * 25 for a in inits.values())

    # onnxruntime folds Cast and Mul when it loads the model: the Conv reads an initializer.
    assert testing.optimized_ops(out, tmp_path)["Cast"] == 0

    # The model computes exactly the float model with the dequantized weights, whose
    # values numpy's float32 multiply gives as DequantizeLinear does.
    dequantized = onnx.load_model(str(path))
    for tensor in dequantized.graph.initializer:
        if tensor.name == "dw_w":
            tensor.CopyFrom(nh.from_array(integers.astype(np.float32) * scale, "dw_w"))
    reference = make_session(dequantized.SerializeToString())
    session = make_session(str(out))
    for sample in samples[:4]:
        np.testing.assert_array_equal(
            session.run(None, sample)[0], reference.run(None, sample)[0]
        )
    assert testing.output_sqnr(path, out, samples) > 35.0


def test_a_depthwise_conv_inside_an_int8_chain_stays_quantized(tmp_path):
    rng = np.random.default_rng(0)
    model = _model(
        [
            _pointwise("expand", "input", "e"),
            h.make_node("Relu", ["e"], ["er"], name="relu_e"),
            _depthwise("dw", "er", "d", kernel=3),
            h.make_node("Relu", ["d"], ["dr"], name="relu_d"),
            _pointwise("project", "dr", "output"),
        ],
        {
            **_weights(rng, 3),
            "expand_w": rng.standard_normal((C, C, 1, 1)) * 0.3,
            "expand_b": np.zeros(C),
            "project_w": rng.standard_normal((C, C, 1, 1)) * 0.3,
            "project_b": np.zeros(C),
        },
    )
    samples = _samples(16)
    path, out, floats = _quantize(model, tmp_path, samples)
    assert "dw" not in floats and "expand" not in floats, floats
    kernels = testing.optimized_ops(out, tmp_path)
    assert kernels["QLinearConv"] >= 2, kernels  # expand and dw run as integer kernels
    assert testing.output_sqnr(path, out, samples) > 25.0


def test_a_wide_conv_between_float_ops_stays_quantized(tmp_path):
    """A Conv reading more than THIN_CONV_MAX_CHANNELS channels per output is not thin."""
    rng = np.random.default_rng(0)
    model = _model(
        [
            h.make_node("HardSwish", ["input"], ["a"], name="act_in"),
            _pointwise("pw", "a", "p"),
            h.make_node("HardSwish", ["p"], ["output"], name="act_out"),
        ],
        {"pw_w": rng.standard_normal((C, C, 1, 1)) * 0.3, "pw_b": np.zeros(C)},
    )
    _path, out, floats = _quantize(model, tmp_path, _samples(16))
    assert "pw" not in floats, floats
    assert testing.optimized_ops(out, tmp_path)["QLinearConv"] == 1


def test_a_depthwise_conv_before_a_float_affine_computes_in_float(tmp_path):
    """Conv -> Mul, Add (scalars) -> HardSwish: a learnable affine layer after a Conv.

    Preparation folds the Mul and Add into the Conv's weight and bias (rule 4 of
    `passes/activations`), and the Conv's output feeds only the float HardSwish: the Conv
    would write int8 only to be read back in float. It is a thin Conv between float ops,
    so it computes in float, and no Q/DQ pair is written.
    """
    rng = np.random.default_rng(0)
    model = _model(
        [
            h.make_node("HardSwish", ["input"], ["a"], name="act_in"),
            _depthwise("dw", "a", "d", kernel=3),
            h.make_node("Mul", ["d", "gain"], ["m"], name="affine_mul"),
            h.make_node("Add", ["m", "shift"], ["t"], name="affine_add"),
            h.make_node("HardSwish", ["t"], ["output"], name="act_out"),
        ],
        {**_weights(rng, 3), "gain": 1.7, "shift": -0.3},
    )
    samples = _samples(16)
    path, out, floats = _quantize(model, tmp_path, samples)
    assert ISLAND in floats["dw"], floats
    assert "affine_mul" not in floats and "affine_add" not in floats, floats
    ops = testing.count_ops(onnx.load_model(str(out)))
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 0, ops
    assert testing.optimized_ops(out, tmp_path)["QLinearConv"] == 0
    assert testing.output_sqnr(path, out, samples) > 35.0
