"""Preparation rules for the activations exporters spell out in elementary ops.

Each rule rewrites a pattern into an equivalent one the quantizer serves better; the model
computes the same up to float rounding. Values keep the names calibration saw wherever they
hold the same numbers, so statistics gathered on the original model still apply; a value
whose numbers change gets a fresh name.

1. `Add(Conv(x), c)` (or ConvTranspose), with `c` constant along the output channels only
   (a bias the exporter wrote as a separate Add, as Paddle does in squeeze-excitation
   blocks), becomes the Conv's bias:  b' = b + c.  The Add would otherwise be one more
   quantized op (an extra requantization and a kernel launch) for what the integer Conv
   adds for free.
2. `HardSigmoid(Conv(x))`, HardSigmoid(y) = clip(alpha * y + beta, 0, 1), folds alpha and
   beta into the Conv:  W' = alpha * W,  b' = alpha * b + beta,  then `Clip(y', 0, 1)`.
   onnxruntime has no integer HardSigmoid; a Clip right after a Conv is absorbed by the
   quantization of the Conv's output (uint8 over [0, 1] saturates exactly where the Clip
   does), so the gate of a squeeze-excitation block stays on the integer chain.
3. `x * Clip(x + 3, 0, 6) / 6` (or `* (1/6)`), HardSwish spelled in four ops as Paddle and
   older PyTorch exports write it, becomes one `HardSwish(x)` (ai.onnx 14 on), or
   `x * HardSigmoid(x; 1/6, 1/2)` below 14; that two-op form (PyTorch's below 14) becomes
   `HardSwish(x)` too where the opset is 14 or is raised to it. Four float ops with their
   Q/DQ pairs (an integer Add, two dequantized operands, a float Mul and Div) become one
   float op between one DequantizeLinear and one QuantizeLinear: fewer roundings and
   fewer passes over the tensor.
4. `Mul(Conv(x), c)` (or ConvTranspose with group 1), with `c` constant along the output
   channels only (a per-channel or scalar scale: the learnable affine layers some mobile
   backbones put after each Conv, `scale * y + bias` written as a Mul and an Add), becomes
   the Conv's weight and bias:  W'[o] = c[o] W[o],  b' = c b.  The Add after it then
   folds by rule 1. Two float passes over the Conv's output (or, after a quantized Conv,
   two float ops between its DequantizeLinear and the next QuantizeLinear) are gone.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from qconvert import ops
from qconvert.graph_utils import add_initializer, constant_array, replace_keeping_name
from qconvert.names import NameAllocator

HARDSWISH_OPSET = 14
"""The first ai.onnx opset with a HardSwish op."""


def sole_reader(value: ir.Value, op_type: str) -> ir.Node | None:
    """The only node that reads `value`, if it is an `op_type` and `value` is internal."""
    consumers = value.consumers()
    if value.is_graph_output() or len(consumers) != 1:
        return None
    node = consumers[0]
    if node.op_type != op_type or node.domain not in ("", "ai.onnx"):
        return None
    return node


def foldable_conv(node: ir.Node) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The float32 weight and bias (None when absent) of a Conv or ConvTranspose."""
    if (
        node.op_type not in ("Conv", "ConvTranspose")
        or node.domain not in ("", "ai.onnx")
        or len(node.outputs) != 1
    ):
        return None
    weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.dtype != np.float32 or weight.ndim < 3:
        return None
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    bias = constant_array(node.inputs[2]) if has_bias else None
    if has_bias and (bias is None or bias.shape != (output_channels(node, weight),)):
        return None
    return weight, bias


def output_channels(node: ir.Node, weight: np.ndarray) -> int:
    """How many output channels a Conv or ConvTranspose with `weight` writes."""
    # Conv's weight is (C_out, C_in / group, k...);
    # ConvTranspose's (C_in, C_out / group, k...).
    if node.op_type == "ConvTranspose":
        return weight.shape[1] * node.attributes.get_int("group", 1)
    return weight.shape[0]


def set_weight_and_bias(
    graph: ir.Graph, names: NameAllocator, conv: ir.Node, weight: np.ndarray, bias: np.ndarray
) -> None:
    """Gives `conv` new weight and bias initializers (the weight only where it changed)."""
    base = conv.name or "conv"
    if not np.array_equal(weight, constant_array(conv.inputs[1])):
        scaled = add_initializer(graph, names.fresh(f"{base}_weight"), weight)
        conv.replace_input_with(1, scaled)
    if len(conv.inputs) < 3:
        conv.resize_inputs(3)
    conv.replace_input_with(2, add_initializer(graph, names.fresh(f"{base}_bias"), bias))


def channel_vector(array: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """`array` as one value per output channel, when it broadcasts along axis 1 only."""
    if array.dtype != np.float32 or array.ndim > rank:
        return None
    if array.size == 1:
        return np.full(channels, array.reshape(()), np.float32)
    shape = (1,) * (rank - array.ndim) + array.shape
    if array.size != channels or shape[1] != channels:
        return None
    return array.reshape(channels)


def _constant_channel_reader(
    conv: ir.Node, op_type: str
) -> tuple[np.ndarray, np.ndarray | None, ir.Node, np.ndarray] | None:
    """The Conv's weight and bias, its reader and the reader's per-channel constant.

    Found where `op_type` alone reads the Conv's output, with a constant along the output
    channels (or a scalar) as its other operand; else None.
    """
    found = foldable_conv(conv)
    reader = sole_reader(conv.outputs[0], op_type) if found is not None else None
    if reader is None:
        return None
    weight, bias = found
    other = reader.inputs[1] if reader.inputs[0] is conv.outputs[0] else reader.inputs[0]
    if other is conv.outputs[0]:
        return None
    array = constant_array(other)
    # A Conv's output has the rank of its weight: (N, C, spatial...).
    vector = (
        channel_vector(array, output_channels(conv, weight), weight.ndim)
        if array is not None
        else None
    )
    if vector is None:
        return None
    return weight, bias, reader, vector


class FoldConvAddIntoBiasPass(ir.passes.InPlacePass):
    """Rule 1: a constant per-channel Add after a Conv becomes the Conv's bias."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        modified = False
        for conv in list(graph):
            found = _constant_channel_reader(conv, "Add")
            if found is None:
                continue
            weight, bias, add, vector = found
            new_bias = (np.zeros_like(vector) if bias is None else bias) + vector
            set_weight_and_bias(graph, names, conv, weight, new_bias.astype(np.float32))
            replace_keeping_name(graph, add, conv.outputs[0])
            modified = True
        if modified:
            RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=modified)


class FoldConvMulIntoWeightPass(ir.passes.InPlacePass):
    """Rule 4: a constant per-channel Mul after a Conv scales the Conv's weight and bias."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        modified = False
        for conv in list(graph):
            found = _constant_channel_reader(conv, "Mul")
            if found is None:
                continue
            weight, bias, mul, vector = found
            # ConvTranspose's output channels are a whole axis of its weight with group 1.
            axis = 0 if conv.op_type == "Conv" else 1
            if axis == 1 and conv.attributes.get_int("group", 1) != 1:
                continue
            channels = vector.size
            shape = [1] * weight.ndim
            shape[axis] = channels
            scale = vector.astype(np.float64)
            new_weight = (weight.astype(np.float64) * scale.reshape(shape)).astype(np.float32)
            bias = np.zeros(channels, np.float32) if bias is None else bias
            new_bias = (bias.astype(np.float64) * scale).astype(np.float32)
            set_weight_and_bias(graph, names, conv, new_weight, new_bias)
            replace_keeping_name(graph, mul, conv.outputs[0])
            modified = True
        if modified:
            RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=modified)


class FoldHardSigmoidIntoConvPass(ir.passes.InPlacePass):
    """Rule 2: HardSigmoid after a Conv becomes a scaled Conv and Clip(0, 1)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        opset = model.opset_imports.get("", 1)
        modified = False
        for conv in list(graph):
            found = foldable_conv(conv)
            gate = sole_reader(conv.outputs[0], "HardSigmoid") if found is not None else None
            if gate is None:
                continue
            weight, bias = found
            alpha = gate.attributes.get_float("alpha", 0.2)
            beta = gate.attributes.get_float("beta", 0.5)
            channels = output_channels(conv, weight)
            bias = np.zeros(channels, np.float32) if bias is None else bias
            new_weight = (weight.astype(np.float64) * alpha).astype(np.float32)
            new_bias = (bias.astype(np.float64) * alpha + beta).astype(np.float32)
            set_weight_and_bias(graph, names, conv, new_weight, new_bias)
            # The Conv's output now holds other numbers than calibration saw under its name.
            conv.outputs[0].name = names.fresh(f"{conv.outputs[0].name}_scaled")
            clip = _clip(graph, names, opset, conv.outputs[0], 0.0, 1.0, gate.name or "gate")
            graph.insert_before(gate, clip)
            replace_keeping_name(graph, gate, clip.outputs[0])
            modified = True
        return ir.passes.PassResult(model, modified=modified)


def _clip(
    graph: ir.Graph,
    names: NameAllocator,
    opset: int,
    value: ir.Value,
    low: float,
    high: float,
    base: str,
) -> ir.Node:
    """A Clip of `value` to [low, high]: bounds as inputs from opset 11, else attributes."""
    if opset >= 11:
        bounds = [
            add_initializer(graph, names.fresh(f"{base}_{side}"), np.array(bound, np.float32))
            for side, bound in (("low", low), ("high", high))
        ]
        return ir.node("Clip", [value, *bounds], name=names.fresh(f"{base}_clip"))
    return ir.node(
        "Clip", [value], {"min": low, "max": high}, name=names.fresh(f"{base}_clip")
    )


def _scalar(value: ir.Value | None) -> float | None:
    array = constant_array(value)
    if array is None or array.size != 1 or array.dtype != np.float32:
        return None
    return float(array.reshape(()))


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The operand of a binary node that is not `value` (None when both are)."""
    if len(node.inputs) != 2:
        return None
    first, second = node.inputs
    if first is value and second is not value:
        return second
    if second is value and first is not value:
        return first
    return None


def _close(found: float | None, wanted: float) -> bool:
    return found is not None and bool(np.isclose(found, wanted, rtol=1e-6, atol=0.0))


def _hardswish_input(clip: ir.Node) -> ir.Value | None:
    """`x` when `clip` is Clip(x + 3, 0, 6) with constant bounds, else None."""
    add = clip.inputs[0].producer() if clip.inputs and clip.inputs[0] is not None else None
    if add is None or add.op_type != "Add" or len(clip.inputs[0].consumers()) != 1:
        return None
    bounds = ops.clamp_bounds(clip)
    if bounds is None or bounds != (0.0, 6.0):
        return None
    for x in add.inputs:
        other = _other(add, x) if x is not None else None
        if other is not None and _close(_scalar(other), 3.0) and constant_array(x) is None:
            return x
    return None


class FuseHardSwishPass(ir.passes.InPlacePass):
    """Rule 3: x * Clip(x + 3, 0, 6) / 6 becomes HardSwish(x).

    So does x * HardSigmoid(x; 1/6, 1/2) from opset 14: the form below 14, which PyTorch
    exports and which this rule writes there; a later preparation at 14 finishes the job.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        opset = model.opset_imports.get("", 1)
        modified = False
        for node in list(graph):
            if opset >= HARDSWISH_OPSET and (gated := _gated_hardswish(node)) is not None:
                x, mul = gated
                fused = ir.node("HardSwish", [x], name=names.fresh(f"{mul.name}_hardswish"))
                graph.insert_before(mul, fused)
                replace_keeping_name(graph, mul, fused.outputs[0])
                modified = True
                continue
            match = _hardswish_match(node)
            if match is None:
                continue
            x, last = match
            base = last.name or "hardswish"
            if opset >= HARDSWISH_OPSET:
                fused = [ir.node("HardSwish", [x], name=names.fresh(f"{base}_hardswish"))]
            else:
                gate = ir.node(
                    "HardSigmoid",
                    [x],
                    {"alpha": 1.0 / 6.0, "beta": 0.5},
                    name=names.fresh(f"{base}_hardsigmoid"),
                )
                gate.outputs[0].name = names.fresh(f"{base}_gate")
                fused = [gate, ir.node("Mul", [x, gate.outputs[0]], name=names.fresh(base))]
            graph.insert_before(last, fused)
            replace_keeping_name(graph, last, fused[-1].outputs[0])
            modified = True
        if modified:
            RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=modified)


def _hardswish_match(clip: ir.Node) -> tuple[ir.Value, ir.Node] | None:
    """(x, the node writing the result) when `clip` is that of x * Clip(x + 3, 0, 6) / 6."""
    if clip.op_type != "Clip" or clip.domain not in ("", "ai.onnx"):
        return None
    x = _hardswish_input(clip)
    mul = sole_reader(clip.outputs[0], "Mul") if x is not None else None
    if mul is None or _other(mul, clip.outputs[0]) is not x:
        return None
    last = _divide_by_six(mul)
    return None if last is None else (x, last)


def _gated_hardswish(gate: ir.Node) -> tuple[ir.Value, ir.Node] | None:
    """(x, the Mul) when `gate` is the HardSigmoid of x * HardSigmoid(x; 1/6, 1/2)."""
    if gate.op_type != "HardSigmoid" or gate.domain not in ("", "ai.onnx"):
        return None
    alpha = gate.attributes.get_float("alpha", 0.2)
    beta = gate.attributes.get_float("beta", 0.5)
    if not (_close(alpha, 1.0 / 6.0) and _close(beta, 0.5)):
        return None
    x = gate.inputs[0]
    mul = sole_reader(gate.outputs[0], "Mul")
    if x is None or mul is None or _other(mul, gate.outputs[0]) is not x:
        return None
    return x, mul


def has_decomposed_hardswish(graph: ir.Graph) -> bool:
    """Whether `graph` spells HardSwish out: x * Clip(x + 3, 0, 6) / 6, or x * HardSigmoid."""
    return any(
        _hardswish_match(node) is not None or _gated_hardswish(node) is not None
        for node in graph
    )


def _divide_by_six(mul: ir.Node) -> ir.Node | None:
    """The only node after `mul`, when it divides by 6 (Div by 6 or Mul by 1/6)."""
    consumers = mul.outputs[0].consumers()
    if mul.outputs[0].is_graph_output() or len(consumers) != 1:
        return None
    last = consumers[0]
    if last.domain not in ("", "ai.onnx") or len(last.inputs) != 2:
        return None
    if last.op_type == "Div" and last.inputs[0] is mul.outputs[0]:
        return last if _close(_scalar(last.inputs[1]), 6.0) else None
    if last.op_type == "Mul":
        return last if _close(_scalar(_other(last, mul.outputs[0])), 1.0 / 6.0) else None
    return None
