"""Static planning rule: a small layer on a float vector computes in float.

A squeeze-excitation gate (GlobalAveragePool -> 1x1 Conv -> Relu -> 1x1 Conv -> gate ->
Mul) reads a vector: one value per channel, no spatial extent. Where that vector exists in
float (the pooling reads a tensor a float op wrote, so it stays float itself), an int8 gate
would be an island: a QuantizeLinear of the vector, onnxruntime's NHWC integer kernels with
a Transpose on each side, then a QuantizeLinear of the scaled tensor for an integer Mul.
The Convs themselves do C_in x C_out multiply-accumulates, under a microsecond either way,
so the island's extra nodes are all it costs. In float, the gate is two Convs that
onnxruntime fuses with their activations, and the Mul runs on the float tensor before the
next layer's single QuantizeLinear.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qconvert import ops
from qconvert.graph_utils import constant_array
from qconvert.plan.patterns import globally_pooled
from qconvert.plan.planner_state import PlannerState

VECTOR_MAX_WEIGHTS = 1 << 16
"""The largest layer on a float vector computed in float (in weights: its
multiply-accumulates a sample). Beyond it the arithmetic an int8 kernel saves can pay for
the QuantizeLinear and layout changes around it."""

VECTOR_REASON = (
    "reads a vector (no spatial extent) that exists in float, with few "
    "multiply-accumulates: an int8 kernel would save less than its QuantizeLinear and "
    "layout changes cost: computes in float"
)


class VectorLayerRules(PlannerState):
    """Decides which small layers on float vectors (gates) compute in float."""

    def _float_vector_layer(self, node: ir.Node, rule: ops.QuantizedOpRule) -> bool:
        """Whether `node` is a small Conv on a vector that exists in float.

        That is a Conv with constant weights of at most VECTOR_MAX_WEIGHTS elements,
        reading a tensor whose every spatial dimension is 1 (or a global pooling's output,
        where shapes are unknown), that no op running quantized writes and no rule has
        planned quantized. Measured one onnxruntime thread, median of 400 interleaved
        runs, on a small text-orientation classifier (48x192 input) whose eight gates after
        a HardSwish read float pooled features (`--recipe fast`): the model ran 0.75x
        float with the gates in float, against 0.81x with them as int8 islands.
        """
        if node.op_type != "Conv" or not rule.weights or len(node.inputs) < 2:
            return False
        weight = constant_array(node.inputs[1])
        source = node.inputs[0]
        if weight is None or source is None or weight.size > VECTOR_MAX_WEIGHTS:
            return False
        if (
            source.name in self.tensors
            or self._written_quantized(source)
            or source.is_graph_input()
            # An override file that names the node or its tensors decides for itself.
            or (node.name or "") in self.overrides.nodes
            or source.name in self.overrides.tensors
            or (node.outputs and node.outputs[0].name in self.overrides.tensors)
        ):
            return False
        return _is_vector(source)


def _is_vector(value: ir.Value) -> bool:
    """Whether `value` has no spatial extent: [N, C, 1, ...], or a global pooling's output.

    A Relu or Clip between (the gate's first activation) keeps the shape, so a tensor they
    write is a vector where their input is.
    """
    shape = value.shape
    if shape is not None and len(shape) >= 3:
        spatial = list(shape[2:])
        if all(isinstance(d, int) for d in spatial):
            return int(np.prod(spatial)) == 1
    if globally_pooled(value):
        return True
    producer = value.producer()
    if producer is not None and producer.op_type in ops.CLAMPS and producer.inputs:
        before = producer.inputs[0]
        after = before.producer() if before is not None else None
        return (
            after is not None
            and after.op_type == "Conv"
            and bool(after.inputs)
            and after.inputs[0] is not None
            and _is_vector(after.inputs[0])
        )
    return False
