"""make_plan(excluded=...): named nodes stay float, and a clamp left float is not folded."""

from __future__ import annotations

import onnx

from qconvert import model as model_io
from qconvert.calibration import calibrate_tensors, tensors_to_calibrate
from qconvert.dataset import DirectorySource, input_specs
from qconvert.passes import InsertQDQPass, prepare
from qconvert.plan import make_plan
from qconvert.schemes import SCHEMES


def _plan(tiny_cnn, tmp_path, excluded):
    model = model_io.load_model(tiny_cnn)
    source = DirectorySource(tmp_path / "calib", input_specs(model))
    prepared = prepare(model, min_opset=SCHEMES["int8"].min_opset)
    ranges = calibrate_tensors(prepared, source, tensors_to_calibrate(prepared))
    return prepared, make_plan(prepared, SCHEMES["int8"], ranges, excluded=excluded)


def _named(plan, op_type):
    # The builder leaves nodes unnamed; preparation names them.
    return next(node.name for node in plan.nodes if node.op_type == op_type)


def test_excluded_gemm_stays_float_with_its_float_weights(tiny_cnn, tmp_path):
    gemm_name = _named(_plan(tiny_cnn, tmp_path, frozenset())[1], "Gemm")
    prepared, plan = _plan(tiny_cnn, tmp_path, frozenset({gemm_name}))
    decisions = {node.name: node for node in plan.nodes}
    assert decisions[gemm_name].quantized is False
    assert decisions[gemm_name].reason == "excluded: stays float"
    assert decisions[_named(plan, "Conv")].quantized is True
    assert "fc_w" not in plan.tensors and "fc_b" not in plan.tensors
    quantized = onnx.load_model_from_string(
        model_io.to_bytes(InsertQDQPass(plan=plan)(prepared).model)
    )
    assert any(t.name == "fc_w" for t in quantized.graph.initializer)
    gemm = next(node for node in quantized.graph.node if node.op_type == "Gemm")
    assert gemm.input[1] == "fc_w"


def test_an_excluded_clamp_is_not_folded(tiny_cnn, tmp_path):
    _, folded = _plan(tiny_cnn, tmp_path, frozenset())
    relu_name = _named(folded, "Relu")
    assert [fold.nodes for fold in folded.folds] == [(relu_name,)]
    _, plan = _plan(tiny_cnn, tmp_path, frozenset({relu_name}))
    assert not plan.folds
    relu = next(node for node in plan.nodes if node.name == relu_name)
    assert relu.quantized is False and relu.reason == "excluded: stays float"
    # The Conv, whose output (named after the folded BatchNormalization) only the float
    # Relu now reads, computes in float: as int8 nothing would read its integers. A thin
    # Conv (three input channels) between float ops says so.
    assert "bn" not in plan.tensors
    conv = next(node for node in plan.nodes if node.op_type == "Conv")
    assert not conv.quantized and conv.reason.startswith("thin Conv between float ops")
    # The MaxPool reads the Relu's float output: a QuantizeLinear of it would have let
    # onnxruntime drop the excluded Relu into it.
    pool = next(node for node in plan.nodes if node.op_type == "MaxPool")
    assert not pool.quantized and f"excluded Relu '{relu_name}'" in pool.reason
