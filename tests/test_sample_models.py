"""End to end on the bundled sample models: size, accuracy, layout."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import SAMPLES

import qconvert
from qconvert import testing
from qconvert.runtime import make_session

MODELS = ("digits_cnn", "digits_dwsep", "digits_transformer")


@pytest.fixture(scope="module", params=MODELS)
def quantized(request, tmp_path_factory):
    name = request.param
    folder = SAMPLES / name
    out = tmp_path_factory.mktemp(name) / "model.int8.onnx"
    report = qconvert.quantize(
        folder / "model.onnx", out, data=folder / "calib", eval_data=folder / "eval"
    )
    return name, out, report


def _accuracy(model_path, folder) -> float:
    """Accuracy computed here, independently of qconvert's compare code."""
    session = make_session(str(model_path))
    files = sorted(p for p in (folder / "eval").glob("s*.npy"))
    labels = np.load(folder / "eval" / "labels.npy")
    predictions = [
        int(np.argmax(session.run(None, {"input": np.load(f)[None]})[0])) for f in files
    ]
    return float(np.mean(np.array(predictions) == labels))


# The transformer's bound is tighter: its Q/DQ, names and bias storage were trimmed to
# 28.9% (from 29.9%); a regression there shows before it reaches 30%.
SIZE_BOUNDS = {"digits_transformer": 0.292}


def test_int8_file_is_at_most_30_percent_of_float(quantized):
    name, out, report = quantized
    ratio = out.stat().st_size / (SAMPLES / name / "model.onnx").stat().st_size
    bound = SIZE_BOUNDS.get(name, 0.30)
    assert ratio <= bound, f"{name}: int8 file is {ratio:.1%} of float"
    assert report.conversion.size_ratio == pytest.approx(ratio)


def test_int8_accuracy_within_one_point_of_float(quantized):
    name, out, report = quantized
    float_accuracy = _accuracy(SAMPLES / name / "model.onnx", SAMPLES / name)
    int8_accuracy = _accuracy(out, SAMPLES / name)
    comparison = report.comparison
    assert comparison.samples == 500
    assert comparison.reference_accuracy == pytest.approx(float_accuracy)
    assert comparison.candidate_accuracy == pytest.approx(int8_accuracy)
    drop = 100 * (float_accuracy - int8_accuracy)
    assert drop <= 1.0, f"{name}: int8 loses {drop:.1f} points"
    assert comparison.accuracy_drop_points == pytest.approx(drop)


def test_layout_has_qdq_where_expected(quantized):
    name, out, _report = quantized
    ops = testing.count_ops(out)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"]
    assert "BatchNormalization" not in ops
    graph = onnx.load_model(str(out)).graph
    consumers = {
        n.op_type for n in graph.node if any(i.endswith("_dequantized") for i in n.input)
    }
    expected = {"digits_cnn": {"Conv", "Gemm"}, "digits_dwsep": {"Conv", "Gemm"}}
    assert expected.get(name, {"MatMul", "Gemm"}) <= consumers
    weights = [
        t
        for t in graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2
    ]
    assert weights, "weights are stored as int8"


# What onnxruntime fuses of each sample model (QLinearConv, QGemm, QLinearMatMul, ...): a
# plan change that costs a kernel shows here.
# digits_dwsep's stem (3x3 on the grey input, widening to 32) computes in float
# (test_float_stem_conv): 8 of its 9 Convs run as integer kernels.
MIN_KERNELS = {"digits_cnn": 4, "digits_dwsep": 8, "digits_transformer": 20}


def test_every_planned_kernel_lands_on_an_integer_kernel(quantized):
    name, _out, report = quantized
    audit = report.conversion.fusion_audit
    assert audit.unplanned == (), [
        (node.name, node.op_type, node.reason)
        for island in audit.unplanned
        for node in island.nodes
    ]
    assert audit.kernel_count >= MIN_KERNELS[name], audit.integer_kernels
