"""The part of a tensor's range its readers cannot tell apart, left off its grid.

HardSwish(x) is 0 for every x at or below -3; HardSigmoid is 0 below -beta / alpha and 1
above (1 - beta) / alpha; Relu and Clip are flat outside their bounds. When every reader of
a quantized tensor is such an op, a value past the flat edge and the edge itself read
alike, so the tensor's grid need only reach the edge: clamping there changes no output,
and the step over the values that matter shrinks. Between the tensor and those ops may sit
increasing affine maps by constant scalars (a Mul or Div by a positive scalar, an Add or
Sub of one: the learnable affine layer some mobile backbones put after each Conv), whose
inverse carries the edge back to the tensor.

A batch-normalised Conv in front of a HardSwish writes about as much below zero as above
it: on a text-probability-map detector's first blocks [-207, 178], where only [-3, 178] reaches
the HardSwish's output apart from 0. Cutting at -3 there halves the step of the values that
matter (1.51 -> 0.71).

The cut keeps one step beyond the edge, so that after the zero point is rounded onto the
grid the edge itself is still on it and is read exactly.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from qconvert.calibration import TensorRange
from qconvert.graph_utils import constant_array

_AFFINE_DEPTH = 4
"""Affine ops followed from the tensor to the flat readers, at most."""

Bounds = tuple[float, float]
"""Where the readers stop being flat: below the first and above the second nothing moves."""


def flat_bounds(value: ir.Value) -> Bounds | None:
    """Where every reader of `value` is flat outside, or None when some reader never is."""
    return _bounds(value, _AFFINE_DEPTH)


def cut_range(tensor_range: TensorRange, bounds: Bounds, levels: int) -> TensorRange:
    """`tensor_range` without what lies past `bounds`, one step of `levels` kept beyond."""
    low, high = tensor_range.min, tensor_range.max
    edge_low, edge_high = bounds
    cut_low = edge_low > low and edge_low < high
    cut_high = edge_high < high and edge_high > low
    if cut_low:
        low = edge_low
    if cut_high:
        high = edge_high
    step = (high - low) / levels
    if cut_low:
        low = max(tensor_range.min, low - step)
    if cut_high:
        high = min(tensor_range.max, high + step)
    if low == tensor_range.min and high == tensor_range.max:
        return tensor_range
    return TensorRange(low, high)


def _bounds(value: ir.Value, depth: int) -> Bounds | None:
    readers = value.consumers()
    if not readers or value.is_graph_output():
        return None
    low, high = math.inf, -math.inf
    for reader in readers:
        found = _reader_bounds(reader, value, depth)
        if found is None:
            return None
        low, high = min(low, found[0]), max(high, found[1])
    return low, high


def _reader_bounds(node: ir.Node, value: ir.Value, depth: int) -> Bounds | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type in ("HardSwish", "HardSigmoid", "Relu", "Clip"):
        if node.inputs[0] is not value or any(v is value for v in node.inputs[1:]):
            return None
    if node.op_type == "HardSwish":
        return -3.0, math.inf
    if node.op_type == "HardSigmoid":
        alpha = node.attributes.get_float("alpha", 0.2)
        beta = node.attributes.get_float("beta", 0.5)
        if alpha <= 0.0:
            return None
        return -beta / alpha, (1.0 - beta) / alpha
    if node.op_type == "Relu":
        return 0.0, math.inf
    if node.op_type == "Clip":
        return _clip_bounds(node)
    if depth > 0:
        return _through_affine(node, value, depth - 1)
    return None


def _clip_bounds(node: ir.Node) -> Bounds | None:
    edges = []
    for index, default in ((1, -math.inf), (2, math.inf)):
        operand = node.inputs[index] if len(node.inputs) > index else None
        if operand is None:
            edges.append(default)
            continue
        array = constant_array(operand)
        if array is None or array.size != 1:
            return None
        edges.append(float(array.reshape(())))
    return edges[0], edges[1]


def _through_affine(node: ir.Node, value: ir.Value, depth: int) -> Bounds | None:
    """The bounds of `node`'s readers carried back through `node`, an increasing affine map."""
    if node.op_type not in ("Add", "Sub", "Mul", "Div") or len(node.inputs) != 2:
        return None
    position = 0 if node.inputs[0] is value else 1
    if node.inputs[1 - position] is value:
        return None
    array = constant_array(node.inputs[1 - position])
    if array is None or array.size != 1 or array.dtype.kind != "f":
        return None
    constant = float(array.reshape(()))
    if node.op_type == "Sub" and position == 1:
        return None  # c - x decreases
    if node.op_type == "Div" and position == 1:
        return None  # c / x is not affine
    if node.op_type in ("Mul", "Div") and not constant > 0.0:
        return None
    found = _bounds(node.outputs[0], depth)
    if found is None:
        return None
    low, high = found
    if node.op_type == "Add":
        return low - constant, high - constant
    if node.op_type == "Sub":
        return low + constant, high + constant
    if node.op_type == "Mul":
        return low / constant, high / constant
    return low * constant, high * constant
