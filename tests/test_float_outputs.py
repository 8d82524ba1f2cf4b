"""A Gemm or MatMul that no quantized op reads writes its output in float.

Its integer kernel (QGemm, MatMulIntegerToFloat) needs no QuantizeLinear after it, so one
there would only round and clip. The case that matters is the logits of a classifier:
they grow with the evidence in the input, past the range calibration saw.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from qconvert import testing
from qconvert.passes import matmul_bias
from qconvert.runtime import make_session

ROWS = 8
CLASSES = 10


def _flat_classifier(op: str, reader: str) -> onnx.ModelProto:
    """Conv -> Relu -> Flatten -> Gemm or MatMul (10 classes) -> Identity or Softmax.

    No global pooling before the last layer, so it is not a classifier head that
    computes in float (`HEAD_FLOAT_MAX_WEIGHTS`): it runs on the integers.
    """
    rng = np.random.default_rng(5)
    features = 4 * ROWS * ROWS
    if op == "Gemm":
        last = [h.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1)]
        fc_w = rng.standard_normal((CLASSES, features)) * 0.3
    else:
        last = [h.make_node("MatMul", ["flat", "fc_w"], ["logits"], name="fc")]
        fc_w = rng.standard_normal((features, CLASSES)) * 0.3
    if op == "MatMul+Add":  # a Dense layer as TensorFlow exporters write it: bias (1, N)
        last = [
            h.make_node("MatMul", ["flat", "fc_w"], ["product"], name="fc"),
            h.make_node("Add", ["product", "fc_b"], ["logits"], name="fc_bias"),
        ]
    extra = {"axis": 1} if reader == "Softmax" else {}
    nodes = [
        h.make_node("Conv", ["input", "conv_w", "conv_b"], ["x"], name="conv", pads=[1] * 4),
        h.make_node("Relu", ["x"], ["r"], name="relu"),
        h.make_node("Flatten", ["r"], ["flat"], name="flatten"),
        *last,
        h.make_node(reader, ["logits"], ["output"], name="reader", **extra),
    ]
    inits = {
        "conv_w": rng.standard_normal((4, 3, 3, 3)) * 0.3,
        "conv_b": np.zeros(4),
        "fc_w": fc_w,
        "fc_b": rng.standard_normal(CLASSES) * 0.1,
    }
    if op == "MatMul":
        del inits["fc_b"]
    elif op == "MatMul+Add":
        inits["fc_b"] = inits["fc_b"].reshape(1, CLASSES)
    graph = h.make_graph(
        nodes,
        "flat_classifier",
        [h.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, ROWS, ROWS])],
        [h.make_tensor_value_info("output", TensorProto.FLOAT, ["N", CLASSES])],
        [nh.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _samples(count: int, *, one_row: bool, seed: int) -> list[dict]:
    """Noise images; with `one_row`, each keeps one row (in turn), zero elsewhere.

    Every feature (a position of the Relu map) then sees its usual values in calibration,
    but the logits, a sum over all rows, stay small there and grow on whole images.
    """
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(count):
        image = rng.standard_normal((1, 3, ROWS, ROWS)).astype(np.float32)
        if one_row:
            keep = index % ROWS
            image[:, :, :keep, :] = 0.0
            image[:, :, keep + 1 :, :] = 0.0
        samples.append({"input": image})
    return samples


def _fc_output_readers(path) -> list[str]:
    model = onnx.load_model(str(path))
    return [node.op_type for node in model.graph.node if "logits" in node.input]


def _logits_agreement(reference_path, candidate_path, samples) -> tuple[float, float]:
    """Top-1 agreement and SQNR (dB) of the logits (the Softmax is monotonic)."""
    reference, candidate = (make_session(str(p)) for p in (reference_path, candidate_path))
    pairs = [(reference.run(None, s)[0], candidate.run(None, s)[0]) for s in samples]
    agree = float(np.mean([a.argmax() == b.argmax() for a, b in pairs]))
    sqnr = testing.output_sqnr(reference_path, candidate_path, samples)
    return agree, sqnr


def test_a_gemm_read_by_identity_writes_float_logits_on_qgemm(tmp_path):
    model = _flat_classifier("Gemm", "Identity")
    calib = _samples(32, one_row=True, seed=0)
    path, out, _, report = testing.quantize_fast(model, tmp_path, "rule", calib)
    assert report.conversion.quantized_ops.get("Gemm") == 1
    # The Identity reads the Gemm's float output, not a DequantizeLinear of it.
    assert _fc_output_readers(out) == ["Identity"]
    # onnxruntime still runs the layer on the integers, writing float.
    runs = testing.optimized_ops(out, tmp_path)
    assert runs["QGemm"] == 1 and runs["Gemm"] == 0

    # The same plan with the logits forced to uint8 (an override): their calibrated range
    # clips whole images, whose logits are a sum over all rows.
    _, forced, _, _ = testing.quantize_fast(
        model, tmp_path, "forced", calib, overrides='[tensors]\n"logits" = "uint8"\n'
    )
    assert _fc_output_readers(forced) == ["QuantizeLinear"]
    whole = _samples(64, one_row=False, seed=1)
    agree, sqnr = _logits_agreement(path, out, whole)
    forced_agree, forced_sqnr = _logits_agreement(path, forced, whole)
    assert sqnr > forced_sqnr + 6.0, (sqnr, forced_sqnr)
    assert agree >= 0.95 and agree > forced_agree, (agree, forced_agree)


def test_a_matmul_read_by_a_float_softmax_writes_float_on_an_integer_kernel(tmp_path):
    # A Softmax writing a graph output stays float (no integer kernel without a quantized
    # output), so it does not count as a quantized reader either.
    model = _flat_classifier("MatMul", "Softmax")
    path, out, floats, report = testing.quantize_fast(
        model, tmp_path, "matmul", _samples(32, one_row=True, seed=0)
    )
    assert report.conversion.quantized_ops.get("MatMul") == 1
    assert "reader" in floats
    assert _fc_output_readers(out) == ["Softmax"]
    runs = testing.optimized_ops(out, tmp_path)
    assert runs["MatMulIntegerToFloat"] == 1 and runs["MatMul"] == 0
    agree, _ = _logits_agreement(path, out, _samples(64, one_row=False, seed=1))
    assert agree >= 0.95


def test_a_matmul_with_a_row_bias_writes_float_on_one_qgemm(tmp_path, monkeypatch):
    # MatMul -> Add with a (1, N) bias, only a float Softmax after: the bias becomes the
    # vector it stands for, stored int32, and onnxruntime runs the pair as one QGemm.
    model = _flat_classifier("MatMul+Add", "Softmax")
    calib = _samples(32, one_row=True, seed=0)
    path, out, _, report = testing.quantize_fast(model, tmp_path, "row", calib)
    assert report.conversion.quantized_ops.get("MatMul") == 1
    assert report.conversion.quantized_ops.get("Add") == 1
    biases = [t for t in onnx.load_model(str(out)).graph.initializer if t.name == "fc_b_q"]
    assert [(b.data_type, list(b.dims)) for b in biases] == [(TensorProto.INT32, [CLASSES])]
    runs = testing.optimized_ops(out, tmp_path)
    assert runs["QGemm"] == 1 and not {"Gemm", "MatMul", "Add"} & set(runs)
    whole = _samples(64, one_row=False, seed=1)
    agree, sqnr = _logits_agreement(path, out, whole)

    # Without the reshape the bias stays float, and onnxruntime's float MatMul+Add fusion
    # (before its QDQ fusions) leaves a float Gemm on weights dequantized at every run.
    monkeypatch.setattr(
        matmul_bias.FlattenMatMulBiasPass,
        "call",
        lambda self, model: ir.passes.PassResult(model, modified=False),
    )
    _, row, _, _ = testing.quantize_fast(model, tmp_path, "row_kept", calib)
    assert testing.optimized_ops(row, tmp_path)["Gemm"] == 1
    row_agree, row_sqnr = _logits_agreement(path, row, whole)
    # The int32 bias rounds at a step of input scale x weight scale: the same numbers.
    assert agree >= 0.95 and agree >= row_agree
    assert abs(sqnr - row_sqnr) < 0.5, (sqnr, row_sqnr)


def test_a_gemm_read_by_a_quantized_op_keeps_its_output_quantized(tmp_path):
    # A Relu after the Gemm, then a second Gemm: the first Gemm's output is an integer
    # kernel's input, so it stays quantized (the Relu folds into its QuantizeLinear).
    rng = np.random.default_rng(7)
    graph = h.make_graph(
        [
            h.make_node("Gemm", ["input", "w1", "b1"], ["y"], name="fc1", transB=1),
            h.make_node("Relu", ["y"], ["r"], name="relu"),
            h.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="fc2", transB=1),
            h.make_node("Identity", ["logits"], ["output"], name="reader"),
        ],
        "two_gemms",
        [h.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 16])],
        [h.make_tensor_value_info("output", TensorProto.FLOAT, ["N", CLASSES])],
        [
            nh.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
            for name, shape in (
                ("w1", (32, 16)),
                ("b1", (32,)),
                ("w2", (CLASSES, 32)),
                ("b2", (CLASSES,)),
            )
        ],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    samples = [{"input": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(16)]
    _, out, _, report = testing.quantize_fast(model, tmp_path, "two", samples)
    assert report.conversion.quantized_ops.get("Gemm") == 2
    written = onnx.load_model(str(out))
    quantized_outputs = {
        node.input[0] for node in written.graph.node if node.op_type == "QuantizeLinear"
    }
    assert "y" in quantized_outputs
    assert "logits" not in quantized_outputs
    assert testing.optimized_ops(out, tmp_path)["QGemm"] == 2
