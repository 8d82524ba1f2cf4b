"""The fusion audit knows onnxruntime's own expansion of a HardSwish as a planned island.

A HardSwish that writes straight into a QuantizeLinear is expanded by onnxruntime into
nameless HardSigmoid + Mul nodes writing a tensor of its own making, so neither names nor
tensors lead back to the plan.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from qconvert.fusion_audit import audit_graph


def _expanded_hardswish(*, named: bool) -> onnx.GraphProto:
    """DQ -> HardSigmoid(1/6, 1/2) -> Mul -> Q, as onnxruntime expands a HardSwish
    (nameless nodes), or as a model's own named nodes would read."""
    scale = nh.from_array(np.array(0.1, np.float32), "s")
    zero = nh.from_array(np.array(128, np.uint8), "z")
    nodes = [
        h.make_node("DequantizeLinear", ["xq", "s", "z"], ["x"], name="dq"),
        h.make_node(
            "HardSigmoid", ["x"], ["g"], alpha=1 / 6, beta=0.5, name="gate" if named else ""
        ),
        h.make_node("Mul", ["x", "g"], ["_token_1"], name="mul" if named else ""),
        h.make_node("QuantizeLinear", ["_token_1", "s", "z"], ["yq"], name="q"),
    ]
    return h.make_graph(
        nodes,
        "expanded",
        [h.make_tensor_value_info("xq", TensorProto.UINT8, [4])],
        [h.make_tensor_value_info("yq", TensorProto.UINT8, [4])],
        [scale, zero],
    )


def test_the_audit_knows_onnxruntimes_hardswish_body_as_planned():
    (island,) = audit_graph(_expanded_hardswish(named=False)).islands
    assert island.planned
    assert [node.op_type for node in island.nodes] == ["HardSigmoid", "Mul"]
    # Named nodes are the model's own: the audit needs the plan's word on them.
    (island,) = audit_graph(_expanded_hardswish(named=True)).islands
    assert not island.planned
