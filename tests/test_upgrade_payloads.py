"""The opset upgrade converts the graph without its large weights' values."""

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from qconvert.passes.opset_upgrade import STRIPPED_PAYLOAD_BYTES, UpgradeOpsetPass
from qconvert.runtime import make_session


def _model() -> onnx.ModelProto:
    """MatMul by a 32 KB weight, then ReduceMean at opset 12 (axes an attribute, which the
    upgrade to 18 turns into a small constant input)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    b = rng.standard_normal(128).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["mm"]),
            helper.make_node("Add", ["mm", "b"], ["added"]),
            helper.make_node("ReduceMean", ["added"], ["y"], axes=[1], keepdims=1),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 1])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)], ir_version=8)


def test_the_upgraded_model_keeps_the_weights_and_computes_the_same():
    proto = _model()
    model = ir.serde.deserialize_model(proto)
    upgraded = UpgradeOpsetPass(min_opset=21)(model).model
    assert upgraded.opset_imports[""] == 21
    big = upgraded.graph.initializers["w"].const_value
    assert big.nbytes > STRIPPED_PAYLOAD_BYTES
    assert big is model.graph.initializers["w"].const_value  # shared, not copied
    np.testing.assert_array_equal(
        upgraded.graph.initializers["b"].const_value.numpy(),
        numpy_helper.to_array(proto.graph.initializer[1]),
    )
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    before = make_session(proto.SerializeToString()).run(None, {"x": x})[0]
    after_proto = ir.serde.serialize_model(upgraded)
    assert [n.op_type for n in after_proto.graph.node].count("ReduceMean") == 1
    after = make_session(after_proto.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(before, after)
