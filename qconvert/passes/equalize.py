"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization").

For per-tensor and depthwise weights whose channels differ wildly in range.

For a pair Conv A -> [Relu] -> Conv B where A's output channel i feeds B's input
channel i only, with r1_i = max |A's weights of output channel i| and r2_i = max |B's
weights reading input channel i|:

    s_i = sqrt(r1_i / r2_i),   A_i /= s_i, bias_A_i /= s_i,   B[:, i] *= s_i

Relu(x / s) = Relu(x) / s for s > 0, so the float function is unchanged, and both ranges
become sqrt(r1_i r2_i): the channels share one scale better. Clip (ReLU6) is not
scale-equivariant (Clip(x / s, 0, 6) != Clip(x, 0, 6) / s), so a pair joined by a Clip is
left alone; so is any pair whose middle tensor has another reader or is a graph output.
A is a plain (group 1) or depthwise Conv; B is a plain Conv or a depthwise one with one
input channel per group. Chains (A -> B -> C) are swept until the scales settle.

It runs on the prepared model (BatchNormalization folded into the Conv) before
calibration, so the statistics are those of the equalized tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qconvert.graph_utils import constant_array

SWEEPS = 8
"""Passes over the chain; each brings every pair's two ranges to their geometric mean."""
_TINY = 1e-12


@dataclass(frozen=True, slots=True)
class EqualizedPair:
    """One pair the pass equalized."""

    first: str
    second: str


class EqualizePass(ir.passes.InPlacePass):
    """Equalizes every Conv -> [Relu] -> Conv pair it can (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.pairs: list[EqualizedPair] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        pairs = [pair for node in model.graph if (pair := _pair(node)) is not None]
        for _ in range(SWEEPS):
            for first, second in pairs:
                _equalize(first, second)
        self.pairs = [EqualizedPair(a.name or "", b.name or "") for a, b in pairs]
        return ir.passes.PassResult(model, modified=bool(pairs))


def rescaled_values(model: ir.Model) -> frozenset[str]:
    """The tensors whose channels `EqualizePass` rescales: each pair's middle.

    A's output (and the Relu's after it) carries A's scaled channels until B undoes them;
    every other tensor keeps its values (B's output is B's float function as before).
    """
    names = set()
    for node in model.graph:
        pair = _pair(node)
        if pair is None:
            continue
        value = pair[0].outputs[0]
        while value is not pair[1].inputs[0]:
            names.add(value.name or "")
            value = _only_reader(value).outputs[0]
        names.add(value.name or "")
    return frozenset(names)


def _pair(first: ir.Node) -> tuple[ir.Node, ir.Node] | None:
    if first.op_type != "Conv" or not _conv_weights_constant(first):
        return None
    value = first.outputs[0]
    middle = _only_reader(value)
    if middle is not None and middle.op_type == "Relu":
        value = middle.outputs[0]
        middle = _only_reader(value)
    second = middle
    if second is None or second.op_type != "Conv" or not _conv_weights_constant(second):
        return None
    if second.inputs[0] is not value:
        return None
    channels = constant_array(first.inputs[1]).shape[0]
    group_a = first.attributes.get_int("group", 1)
    group_b = second.attributes.get_int("group", 1)
    weight_b = constant_array(second.inputs[1])
    plain_b = group_b == 1 and weight_b.shape[1] == channels
    depthwise_b = group_b == channels == weight_b.shape[0] and weight_b.shape[1] == 1
    depthwise_a = group_a == channels or group_a == 1
    if not (depthwise_a and (plain_b or depthwise_b)):
        return None
    return first, second


def _only_reader(value: ir.Value) -> ir.Node | None:
    if value.is_graph_output():
        return None
    readers = list(value.consumers())
    return readers[0] if len(readers) == 1 else None


def _conv_weights_constant(node: ir.Node) -> bool:
    if len(node.inputs) < 2 or constant_array(node.inputs[1]) is None:
        return False
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    return bias is None or constant_array(bias) is not None


def _equalize(first: ir.Node, second: ir.Node) -> None:
    # Ranges and rescaled weights are float64 arithmetic on the stored values, made
    # without a float64 copy of each whole weight (`_rescaled`): |w| and its maximum are
    # exact in the weight's own type.
    weight_a = constant_array(first.inputs[1])
    weight_b = constant_array(second.inputs[1])
    depthwise_b = second.attributes.get_int("group", 1) > 1
    axes_a = tuple(range(1, weight_a.ndim))
    range_a = np.abs(weight_a).max(axis=axes_a).astype(np.float64)
    if depthwise_b:
        axes_b = tuple(range(1, weight_b.ndim))
    else:
        axes_b = (0, *range(2, weight_b.ndim))
    range_b = np.abs(weight_b).max(axis=axes_b).astype(np.float64)
    usable = (range_a > _TINY) & (range_b > _TINY)
    ratio = np.where(usable, range_a / np.maximum(range_b, _TINY), 1.0)
    scale = np.sqrt(ratio)
    shape_a = (-1,) + (1,) * (weight_a.ndim - 1)
    _set(first.inputs[1], _rescaled(weight_a, scale.reshape(shape_a), divide=True), first, 1)
    bias = first.inputs[2] if len(first.inputs) > 2 else None
    if bias is not None:
        _set(bias, constant_array(bias).astype(np.float64) / scale, first, 2)
    if depthwise_b:
        shape_b = (-1,) + (1,) * (weight_b.ndim - 1)
    else:
        shape_b = (1, -1) + (1,) * (weight_b.ndim - 2)
    rescaled_b = _rescaled(weight_b, scale.reshape(shape_b), divide=False)
    _set(second.inputs[1], rescaled_b, second, 1)


_BLOCK_ELEMENTS = 1 << 18
"""Weight elements `_rescaled` works on at a time (2 MB of float64)."""


def _rescaled(weight: np.ndarray, factor: np.ndarray, *, divide: bool) -> np.ndarray:
    """`weight / factor` (or `*`) in float64, stored as float32, by blocks of output channels.

    The arithmetic is elementwise, so each block's values are those of the whole;
    on the whole, a 512 x 512 x 3 x 3 weight made a float64 copy of 19 MB and a product
    as large, at every pair and sweep of the recipe's equalization trial.
    """
    result = np.empty(weight.shape, dtype=np.float32)
    step = max(1, _BLOCK_ELEMENTS // max(1, weight[:1].size))
    for start in range(0, weight.shape[0], step):
        rows = slice(start, start + step)
        part = factor if factor.shape[0] == 1 else factor[rows]
        wide = weight[rows].astype(np.float64)
        result[rows] = wide / part if divide else wide * part
    return result


def _set(value: ir.Value, array: np.ndarray, node: ir.Node, index: int) -> None:
    """Gives `node` input `index` the new values, as a fresh initializer if it is shared."""
    array = array.astype(np.float32, copy=False)
    if len(list(value.uses())) > 1 or value.const_value is None:
        graph = node.graph
        fresh = ir.Value(
            name=f"{value.name}_equalized_{node.name}",
            shape=ir.Shape(array.shape),
            type=ir.TensorType(ir.DataType.FLOAT),
            const_value=ir.tensor(array, name=f"{value.name}_equalized_{node.name}"),
        )
        graph.register_initializer(fresh)
        node.replace_input_with(index, fresh)
        return
    value.const_value = ir.tensor(array, name=value.name)
