"""Constants are lifted to initializers as onnx_ir's own pass lifts them, only faster."""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from qconvert.passes.constants import LiftConstantsPass

CONSTANTS = """
    <ir_version: 8, opset_import: ["" : 17]>
    constants (float[2,3] x) => (float[2,3] y, float[2] kept) {
        a = Constant <value = float[2,3] {1, 2, 3, 4, 5, 6}> ()
        b = Constant <value_float = 0.5> ()
        c = Constant <value_floats = [1.0, 2.0, 3.0]> ()
        d = Constant <value_int = 2> ()
        e = Constant <value_ints = [2, 3]> ()
        s = Add (x, a)
        t = Mul (s, b)
        u = Add (t, c)
        r = Reshape (u, e)
        y = Pow (r, d)
        kept = Constant <value = float[2] {7, 8}> ()
    }
"""


def _lifted(lift) -> bytes:
    model = ir.serde.deserialize_model(onnx.parser.parse_model(CONSTANTS))
    model = ir.passes.PassManager([lift])(model).model
    return ir.serde.serialize_model(model).SerializeToString()


def test_the_model_is_the_one_onnx_irs_pass_makes():
    theirs = _lifted(LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0))
    ours = _lifted(LiftConstantsPass())
    assert ours == theirs
    lifted = onnx.ModelProto.FromString(ours).graph
    assert {t.name for t in lifted.initializer} == {"a", "b", "c", "d", "e"}
    # A Constant that is a graph output stays a node.
    assert [node.op_type for node in lifted.node].count("Constant") == 1
