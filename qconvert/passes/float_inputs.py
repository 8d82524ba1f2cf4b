"""Float Conv/ConvTranspose/Gemm nodes read float values, not a DequantizeLinear's output.

onnxruntime's WeightBiasQuantization step quantizes the float weight (int8, one scale per
tensor) and bias of any Conv, ConvTranspose or Gemm whose first input comes from a
DequantizeLinear, so a node left float beside quantized neighbours would run quantized
after all, and worse than planned. This pass makes such a node read the tensor its
input's QuantizeLinear reads, T instead of DQ(Q(T)); the Q/DQ pair stays for the
quantized readers and goes when the float node was its only one.

Where a Relu/Clip was folded into that quantization, T lacks the clamp, so the node reads
Relu(DQ(...)) instead: exact, as a grid starting at 0 holds no negative value, and no
DequantizeLinear feeds the node. A folded grid reaching below 0 is left as it is.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from qconvert.plan import QuantPlan

REQUANTIZED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})
"""The ops whose float weights onnxruntime quantizes behind a DequantizeLinear input."""


class FloatInputsPass(ir.passes.InPlacePass):
    """Rewires the first input of the plan's float nodes around their Q/DQ pair."""

    def __init__(self, *, plan: QuantPlan) -> None:
        super().__init__()
        self.nodes = frozenset(node.name for node in plan.float_nodes())
        # Q of a folded clamp reads the clamp's input: reading that would skip the clamp.
        self.folded_sources = frozenset(fold.source for fold in plan.folds)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in model.graph:
            if node.name not in self.nodes or node.op_type not in REQUANTIZED_OPS:
                continue
            source = _float_source(node.inputs[0])
            if source is None:
                continue
            if source.name not in self.folded_sources:
                node.replace_input_with(0, source)
                modified = True
            elif _never_negative(node.inputs[0]):
                guard = ir.node(
                    "Relu",
                    [node.inputs[0]],
                    name=f"{node.name}_float_input",
                    outputs=[ir.Value(name=f"{node.name}_float_input")],
                )
                node.graph.insert_before(node, guard)
                node.replace_input_with(0, guard.outputs[0])
                modified = True
        if modified:
            RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=modified)


def _float_source(value: ir.Value | None) -> ir.Value | None:
    """T where `value` is DQ(Q(T)), else None."""
    dq = value.producer() if value is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0] is None:
        return None
    q = dq.inputs[0].producer()
    if q is None or q.op_type != "QuantizeLinear":
        return None
    return q.inputs[0]


def _never_negative(dequantized: ir.Value) -> bool:
    """Whether the lowest value of DQ's integer grid, (qmin - zero point) x scale, is 0."""
    dq = dequantized.producer()
    zero_point = dq.inputs[2] if len(dq.inputs) > 2 else None
    if zero_point is None or zero_point.const_value is None:
        return False
    zp = zero_point.const_value.numpy()
    return bool(np.all(zp == np.iinfo(zp.dtype).min))
