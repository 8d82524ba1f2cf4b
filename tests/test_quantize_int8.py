"""Static int8 QDQ on tiny graphs built in code, run in onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import sha256

import qconvert
from qconvert import testing


def _optimized_ops(path, tmp_path) -> list[str]:
    """The op types onnxruntime actually runs after its QDQ fusions."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [
        node.op_type for node in onnx.load_model(options.optimized_model_filepath).graph.node
    ]


def test_conv_bn_relu_layout_and_fidelity(tiny_cnn, tmp_path):
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(tiny_cnn, out, data=tmp_path / "calib")
    ops = testing.count_ops(out)
    # BatchNormalization folded, Relu absorbed by the uint8 zero point, MaxPool and Flatten
    # reuse their input's parameters: one Q per activation, one DQ per quantized tensor.
    assert "BatchNormalization" not in ops and "Relu" not in ops
    assert ops["QuantizeLinear"] == 4  # input, relu, pool, flat
    assert ops["DequantizeLinear"] == 8  # the 4 activations, 2 weights, 2 biases
    assert report.conversion.quantized_ops == {
        "Conv": 1,
        "Flatten": 1,
        "Gemm": 1,
        "MaxPool": 1,
        "Relu": 1,
    }
    assert len(report.conversion.folded_clamps) == 1
    model = onnx.load_model(str(out))
    types = {t.name: t.data_type for t in model.graph.initializer}
    quantized_weights = [n for n in types if n.endswith("weight_q") or n == "fc_w_q"]
    assert quantized_weights and all(
        types[n] == onnx.TensorProto.INT8 for n in quantized_weights
    )
    assert types["fc_b_q"] == onnx.TensorProto.INT32
    assert types["input_zp"] == onnx.TensorProto.UINT8
    feeds = [testing.random_inputs(testing.conv_bn_relu(), seed=100 + i) for i in range(16)]
    sqnr = testing.output_sqnr(tiny_cnn, out, feeds)
    assert sqnr >= 25.0, f"SQNR {sqnr:.1f} dB"


def test_onnxruntime_fuses_the_groups_into_integer_kernels(tiny_cnn, tmp_path):
    out = tmp_path / "q.onnx"
    qconvert.quantize(tiny_cnn, out, data=tmp_path / "calib")
    ops = _optimized_ops(out, tmp_path)
    assert "QLinearConv" in ops
    assert "QGemm" in ops
    assert "Conv" not in ops and "Gemm" not in ops
    assert ops.count("DequantizeLinear") == 0  # no float island left between the kernels


def _bias_scales(model: onnx.ModelProto) -> dict[str, onnx.NodeProto | np.ndarray]:
    """Per int32 bias: the node that computes its scale, or the stored scale."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    return {
        node.input[0]: producers.get(node.input[1], inits.get(node.input[1]))
        for node in model.graph.node
        if node.op_type == "DequantizeLinear"
        and node.input[0] in inits
        and inits[node.input[0]].dtype == np.int32
    }


def _stored_bias_scales(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every Mul of two initializers replaced by its float32 result."""
    stored = onnx.ModelProto()
    stored.CopyFrom(model)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in stored.graph.initializer}
    for node in list(stored.graph.node):
        if node.op_type == "Mul" and all(name in inits for name in node.input):
            product = (inits[node.input[0]] * inits[node.input[1]]).astype(np.float32)
            stored.graph.initializer.append(
                onnx.numpy_helper.from_array(product, node.output[0])
            )
            stored.graph.node.remove(node)
    return stored


def test_a_per_channel_bias_scale_is_written_as_the_product_it_is(tmp_path):
    # 32 output channels: the bias scale is input scale x weight scale per channel.
    model = testing.conv_bn_relu(channels=32)
    path = testing.save(model, tmp_path / "m.onnx")
    testing.write_samples(
        tmp_path / "calib", [testing.random_inputs(model, seed=i) for i in range(8)]
    )
    out = tmp_path / "q.onnx"
    qconvert.quantize(path, out, data=tmp_path / "calib")
    quantized = onnx.load_model(str(out))
    conv_bias = next(name for name in _bias_scales(quantized) if "fc" not in name)
    product = _bias_scales(quantized)[conv_bias]
    assert isinstance(product, onnx.NodeProto) and product.op_type == "Mul"
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in quantized.graph.initializer}
    conv = next(n for n in quantized.graph.node if n.op_type == "Conv")
    dequantizers = {n.output[0]: n for n in quantized.graph.node}
    input_scale, weight_scale = (dequantizers[conv.input[i]].input[1] for i in (0, 1))
    assert list(product.input) == [input_scale, weight_scale]
    assert inits[weight_scale].shape == (32,)
    # The Gemm head has 10 outputs: too few for a Mul to be smaller than the stored scale.
    assert isinstance(_bias_scales(quantized)["fc_b_q"], np.ndarray)
    # onnxruntime folds the Mul and still fuses the Conv, and the product is exactly the
    # scale the int32 bias was computed at: a model storing it runs bit-identically.
    assert "QLinearConv" in testing.optimized_ops(out, tmp_path)
    feeds = testing.random_inputs(model, seed=99)
    stored = _stored_bias_scales(quantized)
    for level in (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    ):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        runs = [
            ort.InferenceSession(
                m.SerializeToString(), options, providers=["CPUExecutionProvider"]
            ).run(None, feeds)
            for m in (quantized, stored)
        ]
        assert all(np.array_equal(a, b) for a, b in zip(*runs, strict=True))


def test_per_channel_weight_axis_and_per_tensor_option(tiny_cnn, tmp_path):
    per_channel = tmp_path / "pc.onnx"
    per_tensor = tmp_path / "pt.onnx"
    qconvert.quantize(tiny_cnn, per_channel, data=tmp_path / "calib")
    qconvert.quantize(
        tiny_cnn,
        per_tensor,
        data=tmp_path / "calib",
        config=qconvert.QuantizeConfig(per_channel=False),
    )

    def weight_scales(path):
        model = onnx.load_model(str(path))
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        return {
            n.input[0]: (
                inits[n.input[1]].shape,
                [a.i for a in n.attribute if a.name == "axis"],
            )
            for n in model.graph.node
            if n.op_type == "DequantizeLinear"
            and inits.get(n.input[0]) is not None
            and inits[n.input[0]].dtype == np.int8
        }

    pc = weight_scales(per_channel)
    assert sorted(v[0] for v in pc.values()) == [(8,), (10,)]
    assert all(axis == [0] for _, axis in pc.values())  # Conv: out channels; Gemm transB: rows
    pt = weight_scales(per_tensor)
    assert all(shape == () and axis == [] for shape, axis in pt.values())


def test_matmul_with_constant_weight(tmp_path):
    model = testing.matmul_add()
    path = testing.save(model, tmp_path / "mm.onnx")
    testing.write_samples(
        tmp_path / "calib", [testing.random_inputs(model, seed=i) for i in range(16)]
    )
    out = tmp_path / "q.onnx"
    qconvert.quantize(path, out, data=tmp_path / "calib")
    # MatMul + Add(b) is one layer writing a float graph output: input, weight and the
    # int32 bias are read through DequantizeLinear, and onnxruntime multiplies integers.
    ops = testing.count_ops(out)
    assert ops["MatMul"] == 1 and ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 3
    inits = {t.name: t.data_type for t in onnx.load_model(str(out)).graph.initializer}
    assert inits["b_q"] == onnx.TensorProto.INT32
    optimized = testing.optimized_ops(out, tmp_path)
    assert optimized["QGemm"] + optimized["MatMulIntegerToFloat"] == 1
    assert "Gemm" not in optimized and "MatMul" not in optimized
    feeds = [testing.random_inputs(model, seed=50 + i) for i in range(8)]
    assert testing.output_sqnr(path, out, feeds) >= 25.0


def test_old_opset_is_upgraded_to_13(tmp_path):
    model = testing.matmul_add(opset=11)
    path = testing.save(model, tmp_path / "old.onnx")
    testing.write_samples(
        tmp_path / "calib", [testing.random_inputs(model, seed=i) for i in range(4)]
    )
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(path, out, data=tmp_path / "calib")
    assert report.conversion.opset_before == 11 and report.conversion.opset_after == 13
    written = {o.domain: o.version for o in onnx.load_model(str(out)).opset_import}
    assert written[""] == 13


def test_same_inputs_give_byte_identical_output(tiny_cnn, tmp_path):
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    qconvert.quantize(tiny_cnn, first, data=tmp_path / "calib")
    qconvert.quantize(tiny_cnn, second, data=tmp_path / "calib")
    assert sha256(first) == sha256(second)


def test_json_report_holds_the_same_facts(run_cli, tiny_cnn, tmp_path):
    out, report = tmp_path / "q.onnx", tmp_path / "report.json"
    result = run_cli(
        "quantize", tiny_cnn, "--data", tmp_path / "calib", "-o", out, "--report", report
    )
    assert result.code == 0, result.err
    data = json.loads(report.read_text())
    assert data["schema_version"] == 1
    conversion = data["conversion"]
    assert conversion["converted_bytes"] == out.stat().st_size
    assert conversion["float_bytes"] == tiny_cnn.stat().st_size
    assert (
        conversion["size_ratio"] == conversion["converted_bytes"] / conversion["float_bytes"]
    )
    assert conversion["quantized_ops"]["Conv"] == 1
    assert "quantized size" in result.out and "Conv x1" in result.out


def test_json_flag_prints_only_json(run_cli, tiny_cnn, tmp_path):
    result = run_cli(
        "quantize", tiny_cnn, "--data", tmp_path / "calib", "-o", tmp_path / "q.onnx", "--json"
    )
    assert result.code == 0
    assert json.loads(result.out)["command"] == "quantize"


def test_relu_then_clip_fold_into_one_quantization_with_the_clip_range(tmp_path):
    rng = np.random.default_rng(0)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        chain (float[N,2,4,4] input) => (float[N,3,4,4] output) {
            conv = Conv <kernel_shape = [1,1]> (input, w1, b1)
            relu = Relu (conv)
            clip = Clip (relu, lo, hi)
            output = Conv <kernel_shape = [1,1]> (clip, w2, b2)
        }
    """
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(
        onnx.numpy_helper.from_array(a, n)
        for n, a in {
            "w1": (rng.standard_normal((3, 2, 1, 1)) * 20).astype(np.float32),
            "b1": np.zeros(3, np.float32),
            "lo": np.float32(0.0),
            "hi": np.float32(6.0),
            "w2": rng.standard_normal((3, 3, 1, 1)).astype(np.float32),
            "b2": np.zeros(3, np.float32),
        }.items()
    )
    path = testing.save(model, tmp_path / "chain.onnx")
    samples = [testing.random_inputs(model, seed=i) for i in range(16)]
    testing.write_samples(tmp_path / "calib", samples)
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(path, out, data=tmp_path / "calib")
    ops = testing.count_ops(out)
    assert "Relu" not in ops and "Clip" not in ops
    assert len(report.conversion.folded_clamps) == 2
    inits = {
        t.name: onnx.numpy_helper.to_array(t)
        for t in onnx.load_model(str(out)).graph.initializer
    }
    # Quantized with the Clip's [0, 6] range, not the Relu's much wider one.
    assert inits["clip_scale"] == pytest.approx(6.0 / 255, rel=1e-3)
    assert testing.output_sqnr(path, out, samples) >= 30


def test_written_names_are_short_and_initializers_carry_no_value_info(tiny_cnn, tmp_path):
    # On a small model, generated names and value_info entries weigh a few percent of the
    # file: each initializer's type is in the tensor already, and names say only T_*.
    out = tmp_path / "q.onnx"
    qconvert.quantize(tiny_cnn, out, data=tmp_path / "calib")
    graph = onnx.load_model(str(out)).graph
    assert not graph.value_info
    quantize = next(n for n in graph.node if n.op_type == "QuantizeLinear")
    assert quantize.name == "input_Q"
    assert list(quantize.input) == ["input", "input_scale", "input_zp"]
    assert list(quantize.output) == ["input_q"]
    dequantize = next(n for n in graph.node if n.input[0] == "input_q")
    assert dequantize.name == "input_DQ" and list(dequantize.output) == ["input_dequantized"]
    names = {t.name for t in graph.initializer}
    assert {"fc_w_q", "fc_w_scale", "fc_b_q", "input_scale", "input_zp"} <= names
    assert testing.count_ops(out)["QuantizeLinear"] > 0
