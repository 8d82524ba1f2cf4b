"""Every scheme and format on tiny graphs built in code, run in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from conftest import sha256

import qconvert
from qconvert import QuantizeConfig, testing
from qconvert.runtime import make_session


def _initializers(path) -> dict[str, np.ndarray]:
    model = onnx.load_model(str(path))
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def _opset(path) -> int:
    model = onnx.load_model(str(path), load_external_data=False)
    return {o.domain: o.version for o in model.opset_import}[""]


def _feeds(model, count=16, seed=100):
    return [testing.random_inputs(model, seed=seed + i) for i in range(count)]


@pytest.fixture
def tiny_matmul(tmp_path):
    model = testing.matmul_add(k=32, n=16)
    path = testing.save(model, tmp_path / "mm.onnx")
    testing.write_samples(tmp_path / "calib", _feeds(model, 32, seed=0))
    return path


def test_int16x8_writes_int16_activations_at_opset_21(tiny_cnn, tmp_path):
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(
        tiny_cnn, out, data=tmp_path / "calib", config=QuantizeConfig(scheme="16x8")
    )
    assert _opset(out) == 21
    assert report.conversion.opset_before == 17 and report.conversion.opset_after == 21
    inits = _initializers(out)
    assert inits["input_zp"].dtype == np.int16
    assert inits["input_zp"] == 0  # 16-bit activations are symmetric
    assert inits["fc_w_q"].dtype == np.int8
    assert inits["fc_b_q"].dtype == np.int32
    model = onnx.load_model(str(out))
    assert all(n.domain == "" for n in model.graph.node)  # standard Q/DQ, not com.microsoft
    # A symmetric int16 range makes Relu no clamp of Q: it stays.
    assert testing.count_ops(out)["Relu"] == 1
    assert any("slower than float" in note for note in report.conversion.notes)
    sqnr = testing.output_sqnr(tiny_cnn, out, _feeds(testing.conv_bn_relu()))
    assert sqnr >= 35.0, f"SQNR {sqnr:.1f} dB"


def test_int16x8_falls_back_to_microsoft_qdq_when_the_upgrade_fails(
    tiny_cnn, tmp_path, monkeypatch
):
    from qconvert.errors import UnsupportedModelError
    from qconvert.pipelines import stages

    real_prepare = stages.prepare

    def failing_at_21(model, *, min_opset):
        if min_opset >= 21:
            raise UnsupportedModelError("no adapter")
        return real_prepare(model, min_opset=min_opset)

    monkeypatch.setattr(stages, "prepare", failing_at_21)
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(
        tiny_cnn, out, data=tmp_path / "calib", config=QuantizeConfig(scheme="16x8")
    )
    model = onnx.load_model(str(out))
    domains = {n.domain for n in model.graph.node if "Quantize" in n.op_type}
    assert domains == {"com.microsoft"}
    assert _opset(out) == 17
    assert any("com.microsoft" in note for note in report.conversion.notes)
    assert testing.output_sqnr(tiny_cnn, out, _feeds(testing.conv_bn_relu())) >= 35.0


def test_int8_dynamic_matmul_layout_and_fusion(tiny_matmul, tmp_path):
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(tiny_matmul, out, config=QuantizeConfig(scheme="int8-dynamic"))
    ops = testing.count_ops(out)
    assert ops["DynamicQuantizeLinear"] == 1 and ops["MatMulInteger"] == 1
    assert "MatMul" not in ops
    inits = _initializers(out)
    assert inits["w_quantized"].dtype == np.int8
    assert inits["w_scale"].shape == (16,)  # one scale per output column
    assert report.conversion.calibration_samples == 0
    assert report.conversion.format == "dynamic"
    assert "DynamicQuantizeMatMul" in testing.optimized_ops(out, tmp_path)
    sqnr = testing.output_sqnr(tiny_matmul, out, _feeds(testing.matmul_add(k=32, n=16)))
    assert sqnr >= 25.0, f"SQNR {sqnr:.1f} dB"


def test_int8_dynamic_quantizes_gemm_and_leaves_conv_float(tiny_cnn, tmp_path):
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(tiny_cnn, out, config=QuantizeConfig(scheme="int8-dynamic"))
    ops = testing.count_ops(out)
    assert ops["Conv"] == 1 and "Gemm" not in ops and ops["MatMulInteger"] == 1
    reasons = {node.op_type: node.reason for node in report.conversion.float_nodes}
    assert "ConvInteger is slower than float" in reasons["Conv"]
    assert any("DynamicQuantizeMatMul" in note for note in report.conversion.notes)
    sqnr = testing.output_sqnr(tiny_cnn, out, _feeds(testing.conv_bn_relu()))
    assert sqnr >= 25.0, f"SQNR {sqnr:.1f} dB"


def test_fp16_converts_weights_keeps_io_float32_and_blocks_exp(tmp_path):
    model = testing.matmul_layernorm_exp()
    path = testing.save(model, tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(path, out, config=QuantizeConfig(scheme="fp16"))
    written = onnx.load_model(str(out))
    inits = _initializers(out)
    assert inits["w_float16"].dtype == np.float16
    assert "w" not in inits  # no float32 copy left behind
    elem = {
        v.name: v.type.tensor_type.elem_type
        for v in (*written.graph.input, *written.graph.output)
    }
    assert elem == {
        "input": onnx.TensorProto.FLOAT,
        "probs": onnx.TensorProto.FLOAT,
        "growth": onnx.TensorProto.FLOAT,
    }
    exp = next(n for n in written.graph.node if n.op_type == "Exp")
    cast_in = next(n for n in written.graph.node if exp.input[0] in n.output)
    assert cast_in.op_type == "Cast"  # Exp reads float32 again
    reasons = {node.op_type: node.reason for node in report.conversion.float_nodes}
    assert "overflows" in reasons["Exp"]
    feeds = _feeds(model)
    assert testing.output_sqnr(path, out, feeds) >= 50.0
    sessions = [make_session(str(p)) for p in (path, out)]
    for f in feeds[:4]:  # the second output (through the float32 Exp) too
        ref, cand = (s.run(["growth"], f)[0] for s in sessions)
        np.testing.assert_allclose(cand, ref, rtol=5e-3)


def test_fp16_without_keep_io_types_has_float16_interface(tmp_path):
    model = testing.matmul_layernorm_exp()
    path = testing.save(model, tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    qconvert.quantize(path, out, config=QuantizeConfig(scheme="fp16", keep_io_types=False))
    written = onnx.load_model(str(out))
    assert written.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert written.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    feeds = testing.random_inputs(model, seed=3)
    (ref,) = make_session(str(path)).run(["probs"], feeds)
    (cand,) = make_session(str(out)).run(
        ["probs"], {"input": feeds["input"].astype(np.float16)}
    )
    np.testing.assert_allclose(cand.astype(np.float32), ref, atol=2e-3)


def test_fp16_on_conv_net_sqnr(tiny_cnn, tmp_path):
    out = tmp_path / "q.onnx"
    qconvert.quantize(tiny_cnn, out, config=QuantizeConfig(scheme="fp16"))
    inits = _initializers(out)
    assert all(a.dtype != np.float32 for a in inits.values() if a.size > 1)
    sqnr = testing.output_sqnr(tiny_cnn, out, _feeds(testing.conv_bn_relu()))
    assert sqnr >= 50.0, f"SQNR {sqnr:.1f} dB"


def test_fp16_weights_stores_float16_and_onnxruntime_folds_the_casts(tiny_cnn, tmp_path):
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(tiny_cnn, out, config=QuantizeConfig(scheme="fp16-weights"))
    inits = _initializers(out)
    assert inits["fc_w_float16"].dtype == np.float16
    assert not [n for n, a in inits.items() if a.dtype == np.float32 and a.size >= 16]
    ops = testing.count_ops(out)
    assert ops["Cast"] == 2 and ops["Conv"] == 1 and ops["Gemm"] == 1
    # Upcast once, at load: the session runs no Cast.
    assert "Cast" not in testing.optimized_ops(out, tmp_path)
    assert report.conversion.format == "float16"
    sqnr = testing.output_sqnr(tiny_cnn, out, _feeds(testing.conv_bn_relu()))
    assert sqnr >= 50.0, f"SQNR {sqnr:.1f} dB"


def test_qop_format_writes_integer_operators(tiny_cnn, tmp_path):
    qdq, qop = tmp_path / "qdq.onnx", tmp_path / "qop.onnx"
    qconvert.quantize(tiny_cnn, qdq, data=tmp_path / "calib")
    report = qconvert.quantize(
        tiny_cnn, qop, data=tmp_path / "calib", config=QuantizeConfig(format="qop")
    )
    ops = testing.count_ops(qop)
    assert ops["QLinearConv"] == 1 and ops["QGemm"] == 1 and ops["MaxPool"] == 1
    assert "Conv" not in ops and "Gemm" not in ops and "DequantizeLinear" not in ops
    assert ops["QuantizeLinear"] == 1  # the model input only
    assert report.conversion.format == "qop"
    model = onnx.load_model(str(qop))
    assert {o.domain for o in model.opset_import} >= {"", "com.microsoft"}
    feeds = _feeds(testing.conv_bn_relu())
    assert testing.output_sqnr(tiny_cnn, qop, feeds) >= 25.0
    # The integer operators compute what the QDQ groups describe.
    assert testing.output_sqnr(qdq, qop, feeds) >= 40.0


def test_qop_matmul(tiny_matmul, tmp_path):
    out = tmp_path / "q.onnx"
    qconvert.quantize(
        tiny_matmul, out, data=tmp_path / "calib", config=QuantizeConfig(format="qop")
    )
    # MatMul writes the Add's input; the Add stays float, so the MatMul writes float from
    # the integers (`_writes_float`): MatMulInteger, then its scales.
    ops = testing.count_ops(out)
    assert ops["MatMulInteger"] == 1 and "MatMul" not in ops
    assert testing.output_sqnr(tiny_matmul, out, _feeds(testing.matmul_add(k=32, n=16))) >= 25


def test_int8_activation_type_and_symmetry(tiny_cnn, tmp_path):
    signed = tmp_path / "s.onnx"
    qconvert.quantize(
        tiny_cnn,
        signed,
        data=tmp_path / "calib",
        config=QuantizeConfig(activation_type="int8", symmetric_activations=True),
    )
    inits = _initializers(signed)
    zero_points = [a for n, a in inits.items() if n.endswith("_zp") and a.ndim == 0]
    assert zero_points and all(z.dtype == np.int8 and z == 0 for z in zero_points)
    assert testing.output_sqnr(tiny_cnn, signed, _feeds(testing.conv_bn_relu())) >= 25.0


def test_reduce_range_keeps_weights_in_seven_bits(tiny_cnn, tmp_path):
    out = tmp_path / "q.onnx"
    qconvert.quantize(
        tiny_cnn, out, data=tmp_path / "calib", config=QuantizeConfig(reduce_range=True)
    )
    inits = _initializers(out)
    weights = [a for a in inits.values() if a.dtype == np.int8 and a.ndim >= 2]
    assert weights and all(np.abs(w.astype(int)).max() == 64 for w in weights)


@pytest.mark.parametrize(
    ("scheme", "fmt"),
    [
        ("int8", "qdq"),
        ("int8", "qop"),
        ("16x8", "qdq"),
        ("int8-dynamic", "qdq"),
        ("fp16", "qdq"),
        ("fp16-weights", "qdq"),
    ],
)
def test_same_inputs_same_options_byte_identical(tiny_cnn, tmp_path, scheme, fmt):
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    for out in (first, second):
        qconvert.quantize(
            tiny_cnn,
            out,
            data=tmp_path / "calib",
            config=QuantizeConfig(scheme=scheme, format=fmt),
        )
    assert sha256(first) == sha256(second)


def test_opset_option_upgrades_and_reports(tiny_cnn, tmp_path):
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(
        tiny_cnn, out, data=tmp_path / "calib", config=QuantizeConfig(opset=19)
    )
    assert _opset(out) == 19
    assert any("from opset 17 to 19" in note for note in report.conversion.notes)


def test_fp16_model_keeps_running_when_a_weight_exceeds_float16(tmp_path):
    model = testing.matmul_add(k=8, n=4)
    weight = next(t for t in model.graph.initializer if t.name == "w")
    big = onnx.numpy_helper.to_array(weight).copy()
    big[0, 0] = 1e6
    weight.CopyFrom(onnx.numpy_helper.from_array(big, "w"))
    path = testing.save(model, tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(path, out, config=QuantizeConfig(scheme="fp16"))
    reasons = {node.op_type: node.reason for node in report.conversion.float_nodes}
    assert "exceeds the float16 range" in reasons["MatMul"]
    assert testing.output_sqnr(path, out, _feeds(model)) >= 50.0


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-row", "per-direction"])
def test_int8_dynamic_lstm_becomes_dynamic_quantize_lstm(tmp_path, per_channel):
    model = testing.lstm(input_size=16, hidden=32)
    path = testing.save(model, tmp_path / "lstm.onnx")
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(
        path, out, config=QuantizeConfig(scheme="int8-dynamic", per_channel=per_channel)
    )
    assert testing.count_ops(out) == {"DynamicQuantizeLSTM": 1}
    inits = _initializers(out)
    assert inits["w_quantized"].shape == (1, 16, 128)  # (directions, K, 4 x hidden)
    assert inits["r_quantized"].dtype == np.int8
    assert inits["w_scale"].shape == ((1, 128) if per_channel else (1,))
    assert any("DynamicQuantizeLSTM" in note for note in report.conversion.notes)
    rng = np.random.default_rng(7)
    feeds = [{"input": rng.standard_normal((8, 2, 16)).astype(np.float32)} for _ in range(4)]
    sqnr = testing.output_sqnr(path, out, feeds)
    assert sqnr >= 25.0, f"SQNR {sqnr:.1f} dB"


def test_int8_dynamic_leaves_gru_float_and_says_why(tmp_path):
    model = testing.lstm()
    node = model.graph.node[0]
    node.op_type = "GRU"  # same inputs, with 3 gates instead of 4
    for tensor in model.graph.initializer:
        rows = {"w": 96, "r": 96, "b": 192}[tensor.name]
        array = onnx.numpy_helper.to_array(tensor)
        sliced = np.ascontiguousarray(array[:, :rows])
        tensor.CopyFrom(onnx.numpy_helper.from_array(sliced, tensor.name))
    path = testing.save(model, tmp_path / "gru.onnx")
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(path, out, config=QuantizeConfig(scheme="int8-dynamic"))
    assert testing.count_ops(out) == {"GRU": 1}
    assert "no dynamically quantized GRU kernel" in report.conversion.float_nodes[0].reason


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_qop_float_outputs_use_conv_integer_and_matmul_integer(tmp_path, per_channel):
    model = testing.conv_and_matmul_outputs()
    path = testing.save(model, tmp_path / "m.onnx")
    calib = testing.write_samples(
        tmp_path / "calib", [testing.random_inputs(model, seed=i) for i in range(8)]
    )
    out = tmp_path / "q.onnx"
    qconvert.quantize(
        path, out, data=calib, config=QuantizeConfig(format="qop", per_channel=per_channel)
    )
    ops = testing.count_ops(out)
    assert ops["ConvInteger"] == 1 and ops["MatMulInteger"] == 1
    assert "Conv" not in ops and "MatMul" not in ops and "DequantizeLinear" not in ops
    written = onnx.load_model(str(out))
    assert [o.name for o in written.graph.output] == ["feature", "projection"]
    feeds = [testing.random_inputs(model, seed=50 + i) for i in range(4)]
    sessions = [make_session(str(p)) for p in (path, out)]
    for name in ("feature", "projection"):
        ref, cand = (
            np.concatenate([s.run([name], f)[0].ravel() for f in feeds]) for s in sessions
        )
        sqnr = 10 * np.log10(np.sum(ref**2) / np.sum((ref - cand) ** 2))
        assert sqnr >= 25.0, f"{name}: SQNR {sqnr:.1f} dB"
