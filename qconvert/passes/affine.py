"""Fold constant affine maps (x * c + d) into the Convs around them.

Some exporters write learnable scale-and-shift layers as a Mul and an Add by constants:
PP-OCRv4's "learnable affine blocks" follow most Convs and every HardSwish of DBNet's
backbone that way. Quantized, each pair is two float passes over the tensor between a
DequantizeLinear and a QuantizeLinear (onnxruntime has no integer kernel that reads a
HardSwish, so the pair cannot join one), where the Convs could absorb it for free.

1. `Mul(Conv(x), c)`, with `c` constant along the output channels only (a scalar among
   them), becomes the Conv:  W' = c W,  b' = c b  (per output channel). A constant Add
   after it is then the Conv's bias (`FoldConvAddIntoBiasPass`).
2. `Add(Mul(h, c), d)` with scalar constants c and d, read only by Convs, moves into them:
   Conv(c h + d) = (c W) * h + d sum(W) wherever no padding enters the window, so a Conv
   without padding takes  W' = c W,  b' = b + d sum(W) (sum over its input channels and
   kernel taps) and reads h. A padded Conv would see d where its zeros were, so it takes
   W' = c W and reads h + d / c:  c (h + d/c) = c h + d, and the zeros pad the same sum;
   one Add is left instead of two ops. Values that hold new numbers get fresh names.

Each rule computes the same function up to float rounding.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from qconvert.graph_utils import add_initializer, constant_array, replace_keeping_name
from qconvert.names import NameAllocator
from qconvert.passes.activations import (
    channel_vector,
    foldable_conv,
    output_channels,
    set_weight_and_bias,
    sole_reader,
)


class FoldConvScaleIntoWeightsPass(ir.passes.InPlacePass):
    """Rule 1: a constant per-channel Mul after a Conv becomes the Conv's weights."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        modified = False
        for conv in list(graph):
            found = foldable_conv(conv)
            mul = sole_reader(conv.outputs[0], "Mul") if found is not None else None
            if mul is None or len(mul.inputs) != 2:
                continue
            if conv.op_type == "ConvTranspose" and conv.attributes.get_int("group", 1) != 1:
                continue  # its output channels are not one weight axis
            weight, bias = found
            other = mul.inputs[1] if mul.inputs[0] is conv.outputs[0] else mul.inputs[0]
            array = constant_array(other)
            channels = output_channels(conv, weight)
            vector = (
                channel_vector(array, channels, weight.ndim) if array is not None else None
            )
            if vector is None:
                continue
            axis = 1 if conv.op_type == "ConvTranspose" else 0
            shape = [1] * weight.ndim
            shape[axis] = -1
            factor = vector.astype(np.float64)
            new_weight = (weight.astype(np.float64) * factor.reshape(shape)).astype(np.float32)
            old_bias = np.zeros(channels) if bias is None else bias.astype(np.float64)
            new_bias = (old_bias * factor).astype(np.float32)
            set_weight_and_bias(graph, names, conv, new_weight, new_bias)
            replace_keeping_name(graph, mul, conv.outputs[0])
            modified = True
        if modified:
            RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=modified)


class FoldAffineIntoConvPass(ir.passes.InPlacePass):
    """Rule 2: a scalar x * c + d read only by Convs moves into their weights and bias."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        modified = False
        for mul in list(graph):
            found = _scalar_affine(mul)
            if found is None:
                continue
            source, scale, add, offset = found
            output = add.outputs[0]
            readers = [node for node, _ in output.uses()]
            if not readers or not all(_reads_input_only(node, output) for node in readers):
                continue
            shifted: ir.Value | None = None
            for conv in readers:
                weight, bias = foldable_conv(conv)
                channels = output_channels(conv, weight)
                old_bias = np.zeros(channels) if bias is None else bias.astype(np.float64)
                new_weight = (weight.astype(np.float64) * scale).astype(np.float32)
                if _padded(conv):
                    if shifted is None:
                        shifted = _shifted_input(graph, names, add, source, offset / scale)
                    set_weight_and_bias(
                        graph, names, conv, new_weight, old_bias.astype(np.float32)
                    )
                    conv.replace_input_with(0, shifted)
                    continue
                taps = weight.astype(np.float64).sum(axis=tuple(range(1, weight.ndim)))
                new_bias = (old_bias + offset * taps).astype(np.float32)
                set_weight_and_bias(graph, names, conv, new_weight, new_bias)
                conv.replace_input_with(0, source)
            modified = True
        if modified:
            RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=modified)


def _scalar_affine(mul: ir.Node) -> tuple[ir.Value, float, ir.Node, float] | None:
    """(h, c, the Add, d) when `mul` is Mul(h, c) read by Add(., d) alone, c and d scalars."""
    if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or len(mul.inputs) != 2:
        return None
    for source, constant in (mul.inputs, reversed(mul.inputs)):
        scale = _scalar(constant)
        if source is None or scale is None or constant_array(source) is not None:
            continue
        add = sole_reader(mul.outputs[0], "Add")
        if add is None or len(add.inputs) != 2 or add.outputs[0].is_graph_output():
            return None
        term = add.inputs[1] if add.inputs[0] is mul.outputs[0] else add.inputs[0]
        offset = _scalar(term)
        # A zero scale would leave d / c undefined; such a layer is constant anyway.
        if offset is None or scale == 0.0 or not np.isfinite(offset / scale):
            return None
        return source, scale, add, offset
    return None


def _scalar(value: ir.Value | None) -> float | None:
    array = constant_array(value)
    if array is None or array.size != 1 or array.dtype != np.float32:
        return None
    return float(array.reshape(()))


def _reads_input_only(node: ir.Node, value: ir.Value) -> bool:
    """Whether `node` is a foldable Conv (not a ConvTranspose) reading `value` as its input."""
    if node.op_type != "Conv" or foldable_conv(node) is None:
        return False
    return node.inputs[0] is value and all(v is not value for v in node.inputs[1:])


def _padded(conv: ir.Node) -> bool:
    """Whether zeros may enter a window of `conv` (explicit pads or SAME auto-padding)."""
    auto_pad = conv.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        return True
    return any(conv.attributes.get_ints("pads", ()))


def _shifted_input(
    graph: ir.Graph, names: NameAllocator, add: ir.Node, source: ir.Value, shift: float
) -> ir.Value:
    """Add(source, shift) beside `add`, under a fresh name (its numbers are new)."""
    base = add.name or "affine"
    array = np.array(shift, np.float32)
    constant = add_initializer(graph, names.fresh(f"{base}_shift"), array)
    node = ir.node(
        "Add",
        [source, constant],
        name=names.fresh(f"{base}_shifted"),
        outputs=[ir.Value(name=names.fresh(f"{add.outputs[0].name}_shifted"))],
    )
    graph.insert_before(add, node)
    return node.outputs[0]
