"""SmoothQuant (Xiao et al. 2023): move activation outliers into the following weights.

Transformer activations hold a few channels far larger than the rest, so one per-tensor
activation scale crushes every other channel. Where LayerNormalization feeds only MatMuls
with constant weights W [K, N] (the Q/K/V and first MLP projections), for each channel j
of the normalized tensor X, with a_j = max |X_j| over the calibration data and
w_j = max over the readers of max |W[j, :]|:

    s_j = a_j**alpha / w_j**(1 - alpha)
    LN's scale and bias /= s_j          (so X_j becomes X_j / s_j)
    every reader's W[j, :] *= s_j       (so X W is unchanged)

alpha = 0.5 balances the two ranges; larger alpha moves more of the difficulty into the
weights, which per-channel int8 handles well. The float function is unchanged. Like
equalization it runs on the prepared model before calibration, so the statistics are those
of the smoothed tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qconvert.graph_utils import constant_array

_TINY = 1e-8


@dataclass(frozen=True, slots=True)
class SmoothSite:
    """A LayerNormalization and the MatMuls that read it."""

    norm: ir.Node
    readers: tuple[ir.Node, ...]

    @property
    def tensor(self) -> str:
        return self.norm.outputs[0].name or ""


def smooth_sites(model: ir.Model) -> list[SmoothSite]:
    """Every LayerNormalization (last axis, constant scale) read only by constant MatMuls."""
    sites = []
    for node in model.graph:
        if node.op_type != "LayerNormalization" or node.attributes.get_int("axis", -1) != -1:
            continue
        if len(node.inputs) < 2 or constant_array(node.inputs[1]) is None:
            continue
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and constant_array(bias) is None:
            continue
        output = node.outputs[0]
        readers = list(output.consumers())
        if output.is_graph_output() or not readers:
            continue
        if all(
            r.op_type == "MatMul"
            and r.inputs[0] is output
            and (w := constant_array(r.inputs[1])) is not None
            and w.ndim == 2
            for r in readers
        ):
            sites.append(SmoothSite(norm=node, readers=tuple(readers)))
    return sites


def channel_absmax(runs: Iterable[Mapping[str, np.ndarray]], names: list[str]):
    """max |x| per channel (last axis) of each named tensor over a stream of runs."""
    result: dict[str, np.ndarray] = {}
    for run in runs:
        for name in names:
            values = np.abs(np.asarray(run[name], dtype=np.float64))
            peak = values.reshape(-1, values.shape[-1]).max(axis=0)
            result[name] = np.maximum(result[name], peak) if name in result else peak
    return result


def smooth(sites: list[SmoothSite], absmax: Mapping[str, np.ndarray], alpha: float) -> int:
    """Applies the migration at every site with statistics; returns how many it changed."""
    changed = 0
    for site in sites:
        activation = absmax.get(site.tensor)
        if activation is None:
            continue
        weights = [constant_array(r.inputs[1]).astype(np.float64) for r in site.readers]
        weight_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        usable = (activation > _TINY) & (weight_max > _TINY)
        balanced = np.maximum(activation, _TINY) ** alpha / np.maximum(weight_max, _TINY) ** (
            1 - alpha
        )
        scale = np.where(usable, balanced, 1.0)
        scale = np.clip(scale, 1e-4, 1e4)  # a dead channel must not blow up the weights
        norm = site.norm
        _set(norm, 1, constant_array(norm.inputs[1]).astype(np.float64) / scale)
        if len(norm.inputs) > 2 and norm.inputs[2] is not None:
            _set(norm, 2, constant_array(norm.inputs[2]).astype(np.float64) / scale)
        for reader, weight in zip(site.readers, weights, strict=True):
            _set(reader, 1, weight * scale[:, None])
        changed += 1
    return changed


def _set(node: ir.Node, index: int, array: np.ndarray) -> None:
    """Gives `node` input `index` new values, as its own initializer if it was shared."""
    value = node.inputs[index]
    array = array.astype(np.float32)
    sole_reader = len(list(value.uses())) == 1
    if sole_reader and value.const_value is not None and value.is_initializer():
        value.const_value = ir.tensor(array, name=value.name)
        return
    name = f"{value.name}_smoothed_{node.name}"
    fresh = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.FLOAT),
        const_value=ir.tensor(array, name=name),
    )
    node.graph.register_initializer(fresh)
    node.replace_input_with(index, fresh)
