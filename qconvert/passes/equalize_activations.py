"""Activation equalization: even out the channel ranges of a tensor where it costs nothing.

One per-tensor activation scale serves every channel. Where a tensor's channels differ in
range by 10-100x (pointwise Convs between learnable affine layers, re-parameterised
blocks), the narrow channels get a handful of levels, and a depthwise Conv that reads
them (one channel in, one out) cannot average that noise away. On a text-probability-map
detector one such tensor quantized alone costs the output 20 dB.

For a tensor T (channels on axis 1) with a_c = max |T_c| over calibration samples and
R = max_c a_c, each channel is scaled up to the widest:

    s_c = clip(R / a_c, 1, MAX_SCALE)
    producer writes T_c * s_c      every reader undoes it:  reads T'_c / s_c

so the float function is unchanged and every channel fills the shared range. Only where
both sides absorb s exactly and for free with per-channel weights:

1. Producer: a Conv with constant weights (output channel c's weights and bias * s_c,
   which per-channel weight quantization stores at the same precision), or a Mul by a
   constant scalar or per-channel factor (the factor * s_c), optionally followed by Adds
   of such constants (each * s_c): the affine a * x + b exporters write after an
   activation (`Add(Mul(x, a), b)`). Between that producer and T there may be a Relu
   or LeakyRelu that nothing else reads: f(x * s) = f(x) * s for s > 0, so the scale
   passes through it (a pointwise Conv -> Relu -> depthwise Conv, where the Relu fuses
   into the Conv and its output is the tensor quantized).
2. Readers, all of them: a depthwise Conv (group = channels, one input channel per group;
   its output channel c's weights / s_c), or a Mul by a constant scalar or per-channel
   factor (the factor / s_c; the Mul and what follows stay float-exact).

A reader that mixes channels (a plain Conv, MatMul) would need its input columns divided,
which per-output-channel weights do not absorb: such tensors are left alone (trying the
geometric-mean split cross-layer equalization uses there was worse on the detector).
`EqualizePass` covers Conv -> [Relu] -> Conv pairs by weights; this covers the tensors
between float islands (HardSwish and the affine ops around it), which it cannot, and
evens a Relu's channels into a depthwise Conv by their measured ranges (with per-channel
weights, the pair's weight ranges say nothing of them). On a two-class depthwise-separable
image classifier one such Relu output (24 channels, widest 15.0, median 4.5) cost its
logits 4 dB quantized alone.
It runs on the prepared model before calibration, so the statistics are those of the equalized
tensors. It needs the constant ops: folding the affine around a HardSwish into the Convs
(branch `affinefold`, not merged: it cost that detector 3.8 -> 0.8 dB) would leave no op to
carry s, short of per-channel Q/DQ scales at the float island's edges.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qconvert.graph_utils import add_initializer, constant_array
from qconvert.names import NameAllocator

MAX_SCALE = 32.0
"""The most a channel is scaled up: past it a channel narrower than 1/32 of the widest is
near-dead, and calibration's few samples say too little about it to stretch it further."""
_TINY = 1e-12

_HOMOGENEOUS = frozenset({"Relu", "LeakyRelu"})
"""Ops between the producer and the tensor that carry a positive per-channel scale through
unchanged: f(x * s) = f(x) * s for s > 0."""


@dataclass(frozen=True, slots=True)
class ActivationSite:
    """A tensor whose channels can be rescaled exactly: who writes it, who reads it."""

    tensor: ir.Value
    channels: int
    rank: int
    producer: tuple[tuple[ir.Node, int], ...]
    """(node, input index) of every constant to multiply by s: a Conv's weights (index 1,
    with its bias at 2 when present) or the factor of a Mul / term of an Add."""
    readers: tuple[tuple[ir.Node, int], ...]
    """(node, input index) of every constant to divide by s."""

    @property
    def name(self) -> str:
        return self.tensor.name or ""


def activation_sites(model: ir.Model) -> list[ActivationSite]:
    """Every tensor of `model` both sides of which absorb a per-channel scale (see above)."""
    sites = []
    for node in model.graph:
        if len(node.outputs) != 1 or node.domain not in ("", "ai.onnx"):
            continue
        site = _site(node.outputs[0])
        if site is not None:
            sites.append(site)
    return sites


def rescaled_values(model: ir.Model) -> frozenset[str]:
    """The tensors whose channels `EqualizeActivationsPass` may rescale.

    Every producer it scales writes scaled channels (the site, and the terms of an Add
    chain before it); the readers undo them, so every other tensor keeps its values.
    """
    sites = activation_sites(model)
    return frozenset(
        node.outputs[0].name or "" for site in sites for node, _ in site.producer
    ) | frozenset(site.name for site in sites)


def _site(value: ir.Value) -> ActivationSite | None:
    readers = list(value.consumers())
    if value.is_graph_output() or not readers:
        return None
    layout = _layout(value, readers)
    if layout is None:
        return None
    channels, rank = layout
    produce = _producer(value, channels, rank)
    if produce is None:
        return None
    undo = []
    for reader in readers:
        edit = _reader(reader, value, channels, rank)
        if edit is None:
            return None
        undo.append(edit)
    if not any(node.op_type == "Conv" for node, _ in (*produce, *undo)):
        return None  # no Conv on either side: nothing here is quantized per tensor alone
    return ActivationSite(
        tensor=value,
        channels=channels,
        rank=rank,
        producer=tuple(produce),
        readers=tuple(undo),
    )


def _layout(value: ir.Value, readers: list[ir.Node]) -> tuple[int, int] | None:
    """(channels, rank) of `value`, read off a Conv on either side."""
    for node in [value.producer(), *readers]:
        if node is not None and node.op_type == "Conv":
            weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
            if weight is not None and weight.ndim >= 3:
                return weight.shape[0], weight.ndim
    return None


def _producer(value: ir.Value, channels: int, rank: int) -> list[tuple[ir.Node, int]] | None:
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Conv":
        weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if weight is None or weight.shape[0] != channels:
            return None
        if bias is not None and constant_array(bias) is None:
            return None
        return [(node, 1)] + ([(node, 2)] if bias is not None else [])
    if node.op_type in _HOMOGENEOUS:
        # Relu(x * s) = Relu(x) * s for s > 0: the scale passes through, onto x's
        # producer, and x must be read only here.
        inner = node.inputs[0]
        if inner is None or inner.is_graph_output() or len(inner.consumers()) != 1:
            return None
        return _producer(inner, channels, rank)
    if node.op_type not in ("Mul", "Add"):
        return None
    found = _constant_operand(node, channels, rank)
    if found is None:
        return None
    index, other = found
    if node.op_type == "Mul":
        return [(node, index)]
    # Add: (y + b) * s = y * s + b * s, so y must be scaled too, and read only here.
    if other.is_graph_output() or len(other.consumers()) != 1:
        return None
    rest = _producer(other, channels, rank)
    return None if rest is None else [(node, index), *rest]


def _reader(
    node: ir.Node, value: ir.Value, channels: int, rank: int
) -> tuple[ir.Node, int] | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Conv":
        weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        depthwise = (
            weight is not None
            and node.inputs[0] is value
            and node.attributes.get_int("group", 1) == channels
            and weight.shape[0] == channels
            and weight.shape[1] == 1
        )
        return (node, 1) if depthwise else None
    if node.op_type == "Mul":
        found = _constant_operand(node, channels, rank)
        if found is not None and found[1] is value:
            return (node, found[0])
    return None


def _constant_operand(node: ir.Node, channels: int, rank: int) -> tuple[int, ir.Value] | None:
    """The constant operand's index and the other operand of a binary op.

    Only a constant that is a scalar or one value per channel (axis 1) counts.
    """
    if len(node.inputs) != 2:
        return None
    for index in (0, 1):
        array = constant_array(node.inputs[index])
        other = node.inputs[1 - index]
        if array is None or other is None or array.dtype != np.float32:
            continue
        if array.size == 1 or _per_channel(array.shape, channels, rank):
            return index, other
    return None


def _per_channel(shape: tuple[int, ...], channels: int, rank: int) -> bool:
    """Whether a constant of `shape` holds one value per channel of a rank-`rank` tensor.

    (C, 1, 1) or (1, C, 1, 1) for NCHW; never (C,), which broadcasts on the last axis.
    """
    if len(shape) > rank:
        return False
    full = (1,) * (rank - len(shape)) + tuple(shape)
    return full[1] == channels and all(d == 1 for i, d in enumerate(full) if i != 1)


def channel_absmax(
    runs: Iterable[Mapping[str, np.ndarray]], names: list[str]
) -> dict[str, np.ndarray]:
    """max |x| per channel (axis 1) of each named tensor over a stream of runs."""
    result: dict[str, np.ndarray] = {}
    for run in runs:
        for name in names:
            values = np.abs(np.asarray(run[name], dtype=np.float64))
            peak = np.moveaxis(values, 1, 0).reshape(values.shape[1], -1).max(axis=1)
            result[name] = np.maximum(result[name], peak) if name in result else peak
    return result


def channel_scales(absmax: np.ndarray) -> np.ndarray:
    """s_c = clip(max_c a_c / a_c, 1, MAX_SCALE); 1 for a channel that never moved."""
    widest = float(absmax.max()) if absmax.size else 0.0
    usable = absmax > _TINY
    ratio = np.where(usable, widest / np.maximum(absmax, _TINY), 1.0)
    return np.clip(ratio, 1.0, MAX_SCALE)


class EqualizeActivationsPass(ir.passes.InPlacePass):
    """Rescales every site in `absmax` so its channels share one range (module docstring)."""

    def __init__(self, *, absmax: Mapping[str, np.ndarray]) -> None:
        super().__init__()
        self.absmax = absmax
        self.tensors: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        names = NameAllocator(model.graph)
        self.tensors = []
        for site in activation_sites(model):
            peaks = self.absmax.get(site.name)
            if peaks is None or peaks.shape != (site.channels,):
                continue
            scale = channel_scales(peaks)
            if np.all(scale == 1.0):
                continue
            for node, index in site.producer:
                _rescale(model.graph, names, node, index, scale, site.rank)
            for node, index in site.readers:
                _rescale(model.graph, names, node, index, 1.0 / scale, site.rank)
            self.tensors.append(site.name)
        return ir.passes.PassResult(model, modified=bool(self.tensors))


def _rescale(
    graph: ir.Graph,
    names: NameAllocator,
    node: ir.Node,
    index: int,
    scale: np.ndarray,
    rank: int,
) -> None:
    """Multiplies `node`'s constant input `index` by `scale` along its channels.

    A Conv's weights (index 1) and bias (2) carry the channel on axis 0; a Mul or Add
    factor becomes one value per channel, shaped to broadcast on axis 1 of a rank-`rank`
    tensor. The result is a fresh initializer, so a constant shared elsewhere is kept.
    """
    array = constant_array(node.inputs[index]).astype(np.float64)
    if node.op_type == "Conv":
        shaped = scale.reshape((-1,) + (1,) * (array.ndim - 1))
    else:
        array = array.reshape((-1,) + (1,) * (rank - 2))  # scalar or per channel
        shaped = scale.reshape((-1,) + (1,) * (rank - 2))
    value = node.inputs[index]
    result = (array * shaped).astype(np.float32)
    if len(value.uses()) == 1:  # only this node reads it: change it where it is
        value.const_value = ir.tensor(result, name=value.name)
        value.shape = ir.Shape(result.shape)
        return
    fresh = add_initializer(graph, names.fresh(f"{value.name}_equalized"), result)
    node.replace_input_with(index, fresh)
