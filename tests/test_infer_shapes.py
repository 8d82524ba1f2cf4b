"""`InferShapesPass` reads the inferred types from the protobuf and merges them as
onnx_ir's `ShapeInferencePass` does: the same model, value for value, without the second
deserialized model."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx_ir.passes.common import ShapeInferencePass

from qconvert import testing
from qconvert.passes.shapes import InferShapesPass

# Conv's output shape, a Reshape through a Shape chain, a graph output declared without a
# shape, a small initializer and a large one.
_CHAIN = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1, 3, 8, 8] x) => (float y, float[2] peak) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w)
    r = Relu (c)
    s = Shape (r)
    n = Slice (s, zero, one)
    flat_shape = Concat <axis = 0> (n, width)
    f = Reshape (r, flat_shape)
    y = MatMul (f, proj)
    p = ReduceMax <keepdims = 0> (y)
    p1 = Unsqueeze (p, zero)
    peak = Concat <axis = 0> (p1, p1)
}
"""


def _chain() -> onnx.ModelProto:
    model = onnx.parser.parse_model(_CHAIN)
    rng = np.random.default_rng(0)
    for name, array in (
        ("w", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)),  # 432 B: stays inline
        ("proj", rng.normal(size=(256, 5)).astype(np.float32)),  # 5 KB: an input for onnx
        ("zero", np.array([0], np.int64)),
        ("one", np.array([1], np.int64)),
        ("width", np.array([256], np.int64)),
    ):
        model.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    onnx.checker.check_model(model, full_check=True)
    return model


def _both(model: onnx.ModelProto) -> tuple[ir.Model, ir.Model, bool, bool]:
    stock = ir.serde.deserialize_model(model)
    ours = ir.serde.deserialize_model(model)
    stock_modified = ShapeInferencePass()(stock).modified
    ours_modified = InferShapesPass()(ours).modified
    return stock, ours, stock_modified, ours_modified


def _types(model: ir.Model) -> dict[str, tuple]:
    values = ir.convenience.create_value_mapping(model.graph)
    return {name: (value.dtype, value.shape) for name, value in values.items()}


def test_shapes_are_inferred_as_the_stock_pass_infers_them():
    model = _chain()
    stock, ours, stock_modified, ours_modified = _both(model)
    assert ours_modified and stock_modified
    assert _types(ours) == _types(stock)
    assert (
        ir.serde.serialize_model(ours).SerializeToString()
        == ir.serde.serialize_model(stock).SerializeToString()
    )
    values = ir.convenience.create_value_mapping(ours.graph)
    assert values["c"].shape == ir.Shape([1, 4, 8, 8])
    assert values["peak"].shape == ir.Shape([2])
    assert values["s"].dtype == ir.DataType.INT64
    # the large initializer went to onnx as an input and came back with its weights
    proj = ours.graph.initializers["proj"]
    assert proj.const_value is not None and proj not in ours.graph.inputs
    # and the model computes what it did
    x = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    expected = ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    ).run(None, {"x": x})
    got = ort.InferenceSession(
        ir.serde.serialize_model(ours).SerializeToString(),
        providers=["CPUExecutionProvider"],
    ).run(None, {"x": x})
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_second_run_changes_nothing():
    model = ir.serde.deserialize_model(_chain())
    assert InferShapesPass()(model).modified
    assert not InferShapesPass()(model).modified


@pytest.mark.parametrize(
    "build",
    [testing.conv_bn_relu, testing.loop_matmul_relu],
    ids=["main graph only", "a Loop body (the stock pass)"],
)
def test_built_models_get_the_stock_pass_result(build):
    stock, ours, stock_modified, ours_modified = _both(build())
    assert ours_modified == stock_modified
    assert (
        ir.serde.serialize_model(ours).SerializeToString()
        == ir.serde.serialize_model(stock).SerializeToString()
    )


def test_a_sequence_output_becomes_a_tensor_as_with_the_stock_pass():
    # (`RestoreSequenceTypesPass` gives it its type back in preparation.)
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[4, 6] x) => (float[2, 6] y) {
            parts = SplitToSequence <axis = 0> (x, two)
            y = SequenceAt (parts, zero)
        }
        """
    )
    model.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(np.array(2, np.int64), "two"),
            onnx.numpy_helper.from_array(np.array(0, np.int64), "zero"),
        ]
    )
    stock, ours, _, _ = _both(model)
    assert _types(ours) == _types(stock)
    assert _types(ours)["parts"][0] == ir.DataType.FLOAT


def test_a_model_inference_refuses_is_left_unchanged():
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[2, 3] a, float[4, 5] b) => (float c) {
            c = Add (a, b)
        }
        """
    )
    ours = ir.serde.deserialize_model(model)
    before = ir.serde.serialize_model(ours).SerializeToString()
    assert not InferShapesPass()(ours).modified
    assert ir.serde.serialize_model(ours).SerializeToString() == before
