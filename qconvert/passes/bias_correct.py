"""Bias correction (Nagel et al. 2019): remove the mean output shift of quantized weights.

A layer y = W x + b whose weights are rounded to W_q computes W_q x + b, off by
(W_q - W) x. Its expectation over the data, (W_q - W) E[x], is a per-output-channel
constant, and the bias can absorb it:

    b' = b - (W_q - W) E[x]

E[x] is the per-channel mean of the layer's float input on the calibration samples
(axis 1 of a Conv input, the feature axis of a Gemm's). For a Conv the shift of output
channel o is sum over its input channels i and taps of (W_q - W)[o, i, ...] E[x_i],
the value at every position away from the padded border. Applies to the Conv and Gemm
nodes of a static plan that have a constant bias and int8-stored weights, whether they
compute quantized or in float.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qconvert import qparams
from qconvert.graph_utils import constant_array
from qconvert.plan import QuantPlan, Role

CORRECTED_OPS = frozenset({"Conv", "Gemm"})


@dataclass(frozen=True, slots=True)
class BiasCorrection:
    """The shift removed from one node's bias."""

    node: str
    max_abs_shift: float


def correctable_nodes(model: ir.Model, plan: QuantPlan) -> list[ir.Node]:
    """The Conv/Gemm nodes with a constant bias whose weight the plan stores as int8.

    Quantized ones, and those that compute in float from int8-stored weights (a node the
    recipe raises): their weights are rounded all the same, and so is the mean of their
    output. Without its correction, raising a 224 CNN's first depthwise Conv
    cost the held-out score 3.3 dB.
    """
    nodes = []
    for node in model.graph:
        if node.op_type not in CORRECTED_OPS or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        if len(node.inputs) < 3 or node.inputs[2] is None:
            continue
        weight = plan.tensors.get(node.inputs[1].name)
        bias = node.inputs[2]
        if weight is None or weight.role is not Role.WEIGHT or constant_array(bias) is None:
            continue
        if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
            continue
        nodes.append(node)
    return nodes


WIDEN_VALUES = 1 << 16
"""Values `channel_means` widens to float64 at a time (512 KiB, one row at least). Widening
a whole activation took a float64 copy of it per tensor and sample (9.6 MB for a
112 x 112 x 96 map); with glibc's mmap threshold fixed at 128 KiB (`memory`) each was
mapped, zeroed and unmapped, the system time of the recipe's bias correction."""


def channel_means(inputs: Iterable[Mapping[str, np.ndarray]], axes: Mapping[str, int]):
    """Per-channel means of each named tensor over a stream of runs.

    `axes` gives each tensor's channel axis; the result maps name -> mean vector. Each
    channel's sum is taken in float64.
    """
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    scratch: list[np.ndarray] = []
    for run in inputs:
        for name, axis in axes.items():
            total, count = _channel_sums(run[name], axis, scratch)
            sums[name] = sums.get(name, 0.0) + total
            counts[name] = counts.get(name, 0) + count
    return {name: sums[name] / counts[name] for name in sums}


def _channel_sums(values, axis: int, scratch: list[np.ndarray]) -> tuple[np.ndarray, int]:
    """(float64 sum of each channel along `axis`, values per channel) of one tensor.

    Each channel's values are summed as one contiguous float64 row, as a widened copy of
    the whole tensor moved to [channels, rest] would be (numpy's pairwise sum over each
    row: the same bits). Where that copy's rows are contiguous (a Conv's NCHW input, or
    every tensor whose channel axis has only ones before it), the rows are widened a
    block at a time into one reused buffer (`scratch`) instead.
    """
    values = np.asarray(values)
    axis = axis % values.ndim if values.ndim else 0
    moved = np.moveaxis(values, axis, 0)
    channels = moved.shape[0] if moved.ndim else 1
    per_channel = moved.size // channels if channels else 0
    rows_contiguous = values.flags.c_contiguous and (
        axis == 1 or int(np.prod(values.shape[:axis])) == 1
    )
    if not rows_contiguous or values.dtype == np.float64 or not per_channel:
        flat = np.asarray(moved, dtype=np.float64).reshape(channels, -1)
        return flat.sum(axis=1), flat.shape[1]
    block = max(1, WIDEN_VALUES // per_channel)
    if not scratch or scratch[0].size < block * per_channel:
        scratch[:] = [np.empty(block * per_channel, np.float64)]
    buffer = scratch[0]
    total = np.empty(channels, np.float64)
    for start in range(0, channels, block):
        stop = min(start + block, channels)
        rows = buffer[: (stop - start) * per_channel].reshape((stop - start, *moved.shape[1:]))
        np.copyto(rows, moved[start:stop], casting="safe")
        rows.reshape(stop - start, per_channel).sum(axis=1, out=total[start:stop])
    return total, per_channel


def input_axis(node: ir.Node) -> int:
    """The channel axis of the node's input: 1 for Conv (NCHW), the last for Gemm."""
    return 1 if node.op_type == "Conv" else -1


@dataclass(frozen=True, slots=True)
class _Shift:
    """One node's output shift, and what it was computed from (`correct_biases`' `known`)."""

    weight: object
    original: object
    params: qparams.QParams
    mean: np.ndarray
    shift: np.ndarray | None


def correct_biases(
    plan: QuantPlan,
    nodes: list[ir.Node],
    means: Mapping[str, np.ndarray],
    originals: Mapping[str, np.ndarray] | None = None,
    known: dict[str, _Shift] | None = None,
) -> list[BiasCorrection]:
    """Subtracts each node's expected output shift from its bias, in place.

    `originals` holds the float weights of nodes whose weights a pass already moved onto
    the grid (adaptive rounding): the shift is measured against those. `known` keeps each
    node's shift by name, and gives it back while its weight and original are the same
    objects and its weight's quantization and input mean the same values: the recipe
    corrects every bias again for each raise it scores, and a raise changes the plan of
    one node and those made float with it (the same bits: the same computation). Only
    shifts of weights not rounded by a pass are kept.
    """
    originals = originals or {}
    corrections = []
    for node in nodes:
        mean = means.get(node.inputs[0].name)
        if mean is None:
            continue
        params = plan.tensors[node.inputs[1].name].qparams
        name = node.name or ""
        weight, original = node.inputs[1].const_value, originals.get(name)
        entry = known.get(name) if known is not None else None
        if not (
            entry is not None
            and entry.weight is weight
            and entry.original is original
            and entry.params.same_as(params)
            and np.array_equal(entry.mean, mean)
        ):
            shift = _shift(node, params, mean, original)
            entry = _Shift(weight, original, params, mean, shift)
            # Only a float weight's: a rounded one (a trial's) would be held past its trial.
            if known is not None and original is None:
                known[name] = entry
        shift = entry.shift
        if shift is None:
            continue
        bias = node.inputs[2]
        corrected = constant_array(bias).astype(np.float64) - shift
        bias.const_value = ir.tensor(corrected.astype(np.float32), name=bias.name)
        corrections.append(BiasCorrection(node.name or "", float(np.abs(shift).max())))
    return corrections


def _shift(
    node: ir.Node, params: qparams.QParams, mean: np.ndarray, original: np.ndarray | None
) -> np.ndarray | None:
    """The mean output shift of `node`'s weights quantized with `params`."""
    current = constant_array(node.inputs[1])
    rounded = qparams.dequantize(qparams.quantize(current, params), params)
    # In place, the float weights widened value by value as they are subtracted: the
    # same float64 differences as subtracting a widened copy, without the copy.
    error = rounded.astype(np.float64)
    del rounded
    np.subtract(error, current if original is None else original, out=error)
    return _output_shift(node, error, mean)


def _output_shift(node: ir.Node, error: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    if node.op_type == "Gemm":
        matrix = error.T if node.attributes.get_int("transB", 0) else error  # [K, O]
        if matrix.shape[0] != mean.size:
            return None
        return node.attributes.get_float("alpha", 1.0) * (mean @ matrix)
    group = node.attributes.get_int("group", 1)
    out_channels, per_group = error.shape[0], error.shape[1]
    if per_group * group != mean.size:
        return None
    taps = error.reshape(out_channels, per_group, -1).sum(axis=2)  # [O, I/g], a new array
    if group == 1:  # every output reads every channel: the means broadcast, no [O, I] copy
        group_means = mean.reshape(1, per_group)
    else:
        group_of = np.arange(out_channels) // (out_channels // group)
        group_means = mean.reshape(group, per_group)[group_of]  # [O, I/g]
    np.multiply(taps, group_means, out=taps)
    return taps.sum(axis=1)
