"""Transformer structures: linear layers written as MatMul + Add, the residual stream, GELU
and positional tables, each built small in code and run in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper as nh

import qconvert
from qconvert import plan, testing
from qconvert.plan import static as plan_static


def _model(text: str, initializers: dict[str, np.ndarray]) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(nh.from_array(a, n) for n, a in initializers.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def _quantize(model, tmp_path, name="q.onnx", samples=32):
    path = testing.save(model, tmp_path / "model.onnx")
    feeds = [testing.random_inputs(model, seed=i) for i in range(samples)]
    calib = testing.write_samples(tmp_path / "calib", feeds)
    out = tmp_path / name
    report = qconvert.quantize(path, out, data=calib)
    return path, out, report


def _eval_feeds(model):
    return [testing.random_inputs(model, seed=100 + i) for i in range(16)]


def _graph(path) -> onnx.GraphProto:
    return onnx.load_model(str(path)).graph


def _two_linears(bias: np.ndarray) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        linears (float[N,8,32] input) => (float[N,8,16] output) {
            mm1 = MatMul (input, w1)
            h = Add (mm1, b1)
            output = MatMul (h, w2)
        }
    """
    return _model(
        text,
        {
            "w1": (rng.standard_normal((32, 32)) * 0.2).astype(np.float32),
            "b1": bias,
            "w2": (rng.standard_normal((32, 16)) * 0.2).astype(np.float32),
        },
    )


def test_matmul_and_the_add_of_its_bias_are_one_layer(tmp_path, monkeypatch):
    # Biases of very different sizes per channel: 8 bits with one scale for the whole
    # vector round the small ones away, the same error for every token.
    bias = np.where(np.arange(32) % 8 == 0, 40.0, 0.3).astype(np.float32)
    bias *= np.where(np.arange(32) % 2 == 0, 1.0, -1.0).astype(np.float32)
    model = _two_linears(bias)
    path, out, report = _quantize(model, tmp_path)
    graph = _graph(out)
    add = next(n for n in graph.node if n.op_type == "Add")
    assert "b1" in add.input  # the bias stays float, exact
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "mm1" for n in graph.node)
    assert report.conversion.quantized_ops == {"MatMul": 2, "Add": 1}
    # onnxruntime multiplies integers and adds the bias once (QGemm, or where its
    # MatMul+Add fusion needs static shapes, MatMulIntegerToFloat and a float Add).
    optimized = testing.optimized_ops(out, tmp_path)
    assert optimized["QGemm"] + optimized["MatMulIntegerToFloat"] == 2
    assert not {"QLinearAdd", "Gemm", "MatMul"} & set(optimized)
    sqnr = testing.output_sqnr(path, out, _eval_feeds(model))
    # Quantizing the MatMul's output, then the Add's with an 8-bit bias, takes two integer
    # kernels and three roundings for what one kernel does with one.
    monkeypatch.setattr(plan_static._Planner, "_bias_add", lambda self, node: None)
    naive = tmp_path / "naive.onnx"
    qconvert.quantize(path, naive, data=tmp_path / "calib")
    assert testing.optimized_ops(naive, tmp_path)["QLinearAdd"] == 1
    assert sqnr >= testing.output_sqnr(path, naive, _eval_feeds(model))
    assert sqnr > 40.0


def _post_ln_block() -> onnx.ModelProto:
    """LayerNorm -> linear -> residual Add -> LayerNorm -> linear, as BERT's blocks."""
    rng = np.random.default_rng(1)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        block (float[N,8,32] input) => (float[N,8,16] output) {
            x = LayerNormalization <axis = -1> (input, g0, z0)
            mm = MatMul (x, w1)
            branch = Add (mm, b1)
            summed = Add (branch, x)
            y = LayerNormalization <axis = -1> (summed, g1, z1)
            output = MatMul (y, w2)
        }
    """
    gamma = np.ones(32, np.float32)
    gamma[5] = 20.0  # an outlier channel, as BERT's LayerNorms have
    return _model(
        text,
        {
            "g0": gamma,
            "z0": np.zeros(32, np.float32),
            "w1": (rng.standard_normal((32, 32)) * 0.2).astype(np.float32),
            "b1": (rng.standard_normal(32) * 0.1).astype(np.float32),
            "g1": np.ones(32, np.float32),
            "z1": np.zeros(32, np.float32),
            "w2": (rng.standard_normal((32, 16)) * 0.2).astype(np.float32),
        },
    )


def test_residual_add_stays_float_and_reads_what_exists_in_float(tmp_path, monkeypatch):
    model = _post_ln_block()
    path, out, report = _quantize(model, tmp_path)
    residual = next(n for n in report.conversion.float_nodes if n.op_type == "Add")
    assert residual.reason == "only float ops read its output: stays float"
    graph = _graph(out)
    summed = next(n for n in graph.node if n.output[0] == "summed")
    # The LayerNorm output it skips over, not that output's dequantized copy; and the
    # branch as the layer wrote it, in float.
    assert sorted(summed.input) == ["branch", "x"]
    inits = {t.name: t.data_type for t in graph.initializer}
    assert inits["b1_q"] == onnx.TensorProto.INT32  # a float-writing layer: int32 bias
    optimized = testing.optimized_ops(out, tmp_path)
    assert optimized["QGemm"] + optimized["MatMulIntegerToFloat"] == 2
    assert not {"Gemm", "MatMul"} & set(optimized)
    sqnr = testing.output_sqnr(path, out, _eval_feeds(model))
    assert sqnr > 23.0  # 20.4 dB with the branch and the skipped-over input quantized
    # Reading the dequantized copy of x puts its rounding (coarse: x has an outlier
    # channel) into the residual stream.
    monkeypatch.setattr(plan_static._Planner, "_readers_of_float_values", lambda self: set())
    naive = tmp_path / "naive.onnx"
    qconvert.quantize(path, naive, data=tmp_path / "calib")
    assert sqnr > testing.output_sqnr(path, naive, _eval_feeds(model)) + 2.0


def _gelu_mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        mlp (float[N,8,16] input) => (float[N,8,16] output) {
            mm1 = MatMul (input, w1)
            h = Add (mm1, b1)
            scaled = Div (h, sqrt2)
            erf = Erf (scaled)
            shifted = Add (erf, one)
            gated = Mul (h, shifted)
            gelu = Mul (gated, half)
            output = MatMul (gelu, w2)
        }
    """
    return _model(
        text,
        {
            "w1": (rng.standard_normal((16, 64)) * 0.3).astype(np.float32),
            "b1": (rng.standard_normal(64) * 0.1).astype(np.float32),
            "sqrt2": np.float32(np.sqrt(2.0)),
            "one": np.float32(1.0),
            "half": np.float32(0.5),
            "w2": (rng.standard_normal((64, 16)) * 0.3).astype(np.float32),
        },
    )


def test_gelu_written_out_with_erf_stays_float_as_one_activation(tmp_path):
    model = _gelu_mlp()
    path, out, report = _quantize(model, tmp_path)
    gelu = {n.op_type: n.reason for n in report.conversion.float_nodes if n.op_type != "Erf"}
    assert gelu == {"Add": plan.GELU_REASON, "Mul": plan.GELU_REASON, "Div": gelu["Div"]}
    # Only float ops read the first layer's output now: it writes float, its bias int32.
    inits = {t.name: t.data_type for t in _graph(out).initializer}
    assert inits["b1_q"] == onnx.TensorProto.INT32
    optimized = testing.optimized_ops(out, tmp_path)
    assert "QLinearMul" not in optimized and not {"Gemm", "MatMul"} & set(optimized)
    assert testing.output_sqnr(path, out, _eval_feeds(model)) > 35.0  # 34.0 with QLinearMul


def _masked_scores() -> onnx.ModelProto:
    rng = np.random.default_rng(4)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        masked (float[N,8,16] input, float[N,1,8] mask) => (float[N,8,16] output) {
            scores = MatMul (input, w)
            keep = Sub (one, mask)
            penalty = Mul (keep, minus)
            masked = Add (scores, penalty)
            probs = Softmax <axis = -1> (masked)
            output = MatMul (probs, v)
        }
    """
    return _model(
        text,
        {
            "w": (rng.standard_normal((16, 8)) * 0.5).astype(np.float32),
            "one": np.float32(1.0),
            "minus": np.float32(-30.0),  # within 100x of the scores: not mixed-range
            "v": (rng.standard_normal((8, 16)) * 0.5).astype(np.float32),
        },
    )


def test_an_add_of_a_tensor_computed_in_float_stays_float(tmp_path):
    model = _masked_scores()
    path = testing.save(model, tmp_path / "model.onnx")
    rng = np.random.default_rng(5)
    samples = [
        {
            "input": rng.standard_normal((1, 8, 16)).astype(np.float32),
            "mask": (rng.random((1, 1, 8)) < 0.7).astype(np.float32),
        }
        for _ in range(32)
    ]
    calib = testing.write_samples(tmp_path / "calib", samples)
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(path, out, data=calib)
    reasons = {n.name: n.reason for n in report.conversion.float_nodes}
    masked = next(n for n in report.conversion.float_nodes if n.op_type == "Add")
    assert masked.reason == "an input comes from a float op: stays float", reasons
    assert testing.output_sqnr(path, out, samples[:8]) > 25.0


def _tables_model() -> onnx.ModelProto:
    """A positional table added to a linear's output, and a grid of pixel offsets added to
    small values (a detector's boxes), both by Adds that stay float."""
    rng = np.random.default_rng(3)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        tables (float[N,16,32] input) => (float[N,16,32] output, float[N,16,64] boxes) {
            mm = MatMul (input, w)
            e = Add (mm, b)
            p = Add (e, pos)
            output = LayerNormalization <axis = -1> (p, g, z)
            mm2 = MatMul (input, w2)
            small = Sigmoid (mm2)
            boxes = Add (small, grid)
        }
    """
    return _model(
        text,
        {
            "w": (rng.standard_normal((32, 32)) * 0.3).astype(np.float32),
            "b": (rng.standard_normal(32) * 0.1).astype(np.float32),
            "pos": (rng.standard_normal((16, 32)) * 0.1).astype(np.float32),
            "g": np.ones(32, np.float32),
            "z": np.zeros(32, np.float32),
            "w2": (rng.standard_normal((32, 64)) * 0.3).astype(np.float32),
            "grid": np.tile(np.arange(64, dtype=np.float32) * 10.0, (16, 1)),
        },
    )


def test_a_table_a_float_add_reads_is_stored_as_int8_per_row(tmp_path):
    model = _tables_model()
    path, out, _report = _quantize(model, tmp_path)
    graph = _graph(out)
    inits = {t.name: nh.to_array(t) for t in graph.initializer}
    assert "pos" not in inits and inits["pos_q"].dtype == np.int8
    # Read by a float Add: dequantized when the model loads, Mul(Cast(pos_q), scale),
    # with one scale per row.
    cast = next(n for n in graph.node if n.input[0] == "pos_q")
    multiply = next(n for n in graph.node if cast.output[0] in n.input)
    assert (cast.op_type, multiply.op_type) == ("Cast", "Mul")
    assert inits[multiply.input[1]].shape == (16, 1)
    # Rounding pixel offsets to 8 bits would move the boxes by pixels: they stay float.
    assert inits["grid"].dtype == np.float32
    assert testing.output_sqnr(path, out, _eval_feeds(model)) > 30.0


def _scaled_attention(factor: float) -> onnx.ModelProto:
    rng = np.random.default_rng(6)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        attention (float[N,8,16] input) => (float[N,8,16] output) {
            q = MatMul (input, wq)
            k = MatMul (input, wk)
            kt = Transpose <perm = [0, 2, 1]> (k)
            scores = MatMul (q, kt)
            scaled = Mul (scores, factor)
            probs = Softmax <axis = -1> (scaled)
            output = MatMul (probs, wv)
        }
    """
    return _model(
        text,
        {
            "wq": (rng.standard_normal((16, 16)) * 0.3).astype(np.float32),
            "wk": (rng.standard_normal((16, 16)) * 0.3).astype(np.float32),
            "factor": np.float32(factor),
            "wv": (rng.standard_normal((8, 16)) * 0.3).astype(np.float32),
        },
    )


def test_a_mul_by_a_positive_constant_folds_into_the_scale(tmp_path, monkeypatch):
    model = _scaled_attention(0.25)
    path, out, report = _quantize(model, tmp_path)
    graph = _graph(out)
    assert "Mul" not in testing.count_ops(out)
    inits = {t.name: nh.to_array(t) for t in graph.initializer}
    dequantize = next(n for n in graph.node if n.output[0] == "scaled_dequantized")
    assert dequantize.input[0] == "scores_q"  # the MatMul's integers, read at scale s/4
    assert inits[dequantize.input[1]] == np.float32(inits["scores_scale"] * np.float32(0.25))
    assert report.conversion.quantized_ops["Mul"] == 1
    sqnr = testing.output_sqnr(path, out, _eval_feeds(model))
    # The same values as a QLinearMul, one kernel and one rounding fewer.
    monkeypatch.setattr(plan_static._Planner, "_fold_scale", lambda self, node: False)
    naive = tmp_path / "naive.onnx"
    qconvert.quantize(path, naive, data=tmp_path / "calib")
    assert testing.optimized_ops(naive, tmp_path)["QLinearMul"] == 1
    assert sqnr >= testing.output_sqnr(path, naive, _eval_feeds(model)) - 0.1
    assert sqnr > 30.0


def test_a_mul_by_a_negative_constant_is_not_folded(tmp_path):
    # A negative factor would reverse the integer grid: it stays a Mul.
    path, out, _report = _quantize(_scaled_attention(-0.25), tmp_path)
    assert testing.count_ops(out)["Mul"] == 1
    assert testing.output_sqnr(path, out, _eval_feeds(_scaled_attention(-0.25))) > 25.0
