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
from qconvert.plan.float_islands import STEM_MIN_VALUES, _values
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


_GATE_STEPS = frozenset({"Relu", "Clip", "HardSigmoid", "Sigmoid"})
"""Elementwise ops a squeeze-excitation gate passes its vector through."""

_GLOBAL_POOLS = frozenset({"GlobalAveragePool", "GlobalMaxPool"})


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

    def _only_float_readers_behind(self, value: ir.Value) -> bool:
        """Whether, were `value`'s writer float, every op reading it would run in float.

        The readers (through Relu and Clip) may be float ops, a global pooling (it reads a
        float tensor, so it stays float), the Mul that applies a squeeze-excitation gate
        computed from the tensor it scales (its gate then reads a float vector,
        `_float_vector_layer`, and both its inputs are float), or a thin Conv whose own
        readers pass this test in turn (`FloatIslandRules._thin_conv_island`); and at
        least one such gate is among them. So a run of thin Convs on a float tensor, with
        a gate behind it, computes in float as a whole: the int8 boundary moves to the
        gate's output, before the first layer with more than a few input channels per
        output. On a small text-orientation classifier (48x192 input), whose first block
        after the stem is a 1x1 Conv of 8 channels, a 3x3 depthwise Conv and a gate, the
        int8 kernels of that block took 25 us and 26 us against 18 us and 7 us in float,
        and the integer Mul of the gate in onnxruntime's NHWC layout 31 us against 4 us:
        the model ran 0.69x float instead of 0.76x (`--recipe fast`, one thread, median of
        400 interleaved runs).
        """
        if (_values(value) or MIN_RUN_VALUES) < MIN_RUN_VALUES:
            return False
        ok, gated = self._float_run_behind(value, 0)
        return ok and gated

    def _float_run_behind(self, value: ir.Value, depth: int) -> tuple[bool, bool]:
        """(`_only_float_readers_behind` without the gate, whether a gate was reached)."""
        readers = value.consumers()
        if not readers or value.is_graph_output() or depth > _MAX_DEPTH:
            return False, False
        if (_values(value) or MIN_RUN_VALUES) < MIN_RUN_VALUES:
            return False, False
        gated = False
        for reader in readers:
            behind: tuple[bool, bool] | None = None
            if reader.op_type in ops.CLAMPS and len(reader.outputs) == 1:
                behind = self._float_run_behind(reader.outputs[0], depth + 1)
            elif reader.op_type in _GLOBAL_POOLS:
                continue
            elif reader.op_type == "Mul" and _applies_own_gate(reader, value):
                gated = True
            elif _thin_conv(reader) is not None and reader.inputs[0] is value:
                if (reader.name or "") in self.overrides.nodes or self._skip_reason(reader):
                    return False, False
                behind = self._float_run_behind(reader.outputs[0], depth + 1)
            elif ops.quantized_rule(reader) is not None or reader.op_type in ops.PASS_THROUGH:
                return False, False
            if behind is not None:
                if not behind[0]:
                    return False, False
                gated = gated or behind[1]
        return True, gated


MIN_RUN_VALUES = STEM_MIN_VALUES
"""A run of thin Convs computes in float as a whole only where each writes at least this
many values a sample (or an unknown number): below it (8x8 test images) either kernel
takes about a microsecond, and only the node count differs."""

_MAX_DEPTH = 8
"""How many thin Convs and clamps `_only_float_readers_behind` follows before it gives up."""

THIN_MAX_CHANNELS = 8
"""As `float_islands.THIN_CONV_MAX_CHANNELS`: input channels per output of a thin Conv."""


def _thin_conv(node: ir.Node) -> np.ndarray | None:
    """The weight of `node` if it is a Conv reading at most THIN_MAX_CHANNELS per output."""
    if node.op_type != "Conv" or len(node.inputs) < 2 or not node.outputs:
        return None
    weight = constant_array(node.inputs[1])
    if weight is None or weight.ndim < 3 or weight.shape[1] > THIN_MAX_CHANNELS:
        return None
    return weight


def _applies_own_gate(mul: ir.Node, value: ir.Value) -> bool:
    """Whether `mul` scales `value` by a squeeze-excitation gate computed from `value`.

    The gate is a global pooling of `value`, then small Convs on the pooled vector and
    elementwise activations (Relu, Clip, HardSigmoid, Sigmoid).
    """
    if len(mul.inputs) != 2 or value not in mul.inputs:
        return False
    gate = mul.inputs[1] if mul.inputs[0] is value else mul.inputs[0]
    for _ in range(_MAX_DEPTH):
        producer = gate.producer() if gate is not None else None
        if producer is None or not producer.inputs:
            return False
        if producer.op_type in _GLOBAL_POOLS:
            return producer.inputs[0] is value
        if producer.op_type == "Conv":
            weight = constant_array(producer.inputs[1]) if len(producer.inputs) > 1 else None
            if weight is None or weight.size > VECTOR_MAX_WEIGHTS:
                return False
        elif producer.op_type not in _GATE_STEPS:
            return False
        gate = producer.inputs[0]
    return False


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
