"""`prepare(in_place=True)` folds the caller's own copy instead of copying it again."""

from __future__ import annotations

import onnx_ir as ir

from qconvert import model as model_io
from qconvert import testing
from qconvert.passes import prepare


def _model() -> ir.Model:
    return ir.serde.deserialize_model(testing.conv_bn_relu())


def test_in_place_folds_the_model_given_and_prepares_it_alike():
    given = _model()
    folded = prepare(given, min_opset=model_io.OLDEST_OPSET, in_place=True)
    copied = prepare(_model(), min_opset=model_io.OLDEST_OPSET)
    assert folded is given
    assert "BatchNormalization" not in {node.op_type for node in given.graph}
    assert model_io.to_bytes(folded) == model_io.to_bytes(copied)


def test_without_in_place_the_folds_run_on_a_copy():
    given = _model()
    folded = prepare(given, min_opset=model_io.OLDEST_OPSET)
    assert folded is not given
    assert "BatchNormalization" in {node.op_type for node in given.graph}


def test_a_model_that_needs_an_upgrade_is_upgraded_either_way():
    given = _model()
    opset = given.opset_imports[""] + 2
    folded = prepare(given, min_opset=opset, in_place=True)
    assert folded.opset_imports[""] == opset
    assert model_io.to_bytes(folded) == model_io.to_bytes(prepare(_model(), min_opset=opset))
