"""Graph inputs whose values lie on a lattice the plan's 8-bit grid misses.

An image fed as pixels mapped to [-1, 1] takes 256 values, the odd multiples of 1/255.
Its minmax grid (scale 2/255, zero point 127) holds only the even ones: every pixel is
half a step off, and rounds up or down by the full half step. No zero point fixes it
(the lattice would need 127.5). On a CTC text recognizer reading such an input that
rounding alone cost the output 22.2 dB and 3 of 42 strings, where the rest of the model
quantized cost less. A continuous input (audio, features) rounds by a quarter step on
average and has no lattice to miss: it takes more distinct values than `MAX_LEVELS`.

The recipe's "float input" step keeps the first layers reading such an input in float
(raised: float compute from int8-stored weights), scored and kept only where it helps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from qconvert import ops, qparams
from qconvert.dataset import Feeds
from qconvert.plan import QuantPlan, Role

MAX_LEVELS = 1024
"""An input with at most this many distinct values over the samples is data on a lattice
(pixels, bytes, a few quantized levels): 4x the 8-bit grid's levels, and fewer than a
single 16-sample batch of a continuous signal takes."""

OFF_GRID_STEPS = 0.25
"""A value this far or further from its grid point, in grid steps, counts as off the
grid: a continuous value is off by a quarter step on average, a lattice value on the grid
by nothing, and one half a step off by exactly half."""

OFF_GRID_SHARE = 0.5
"""The share of an input's values (counted with repeats) that must be off the grid."""


def off_grid_inputs(
    model: ir.Model, plan: QuantPlan, samples: Sequence[Feeds]
) -> tuple[str, ...]:
    """The quantized float graph inputs whose sample values lie on a lattice the grid misses.

    Only values inside the grid's range count: a value beyond it is clipped, which is the
    range's concern, not the lattice's.
    """
    found = []
    for value in model.graph.inputs:
        decision = plan.tensors.get(value.name)
        if decision is None or decision.role is not Role.ACTIVATION:
            continue
        if decision.qparams.axis is not None or not samples:
            continue
        arrays = [np.asarray(feeds[value.name]) for feeds in samples if value.name in feeds]
        if not arrays or not all(np.issubdtype(a.dtype, np.floating) for a in arrays):
            continue
        levels, counts = np.unique(
            np.concatenate([a.reshape(-1) for a in arrays]), return_counts=True
        )
        if levels.size > MAX_LEVELS:
            continue
        if _off_grid_share(levels, counts, decision.qparams) >= OFF_GRID_SHARE:
            found.append(value.name)
    return tuple(found)


def _off_grid_share(levels: np.ndarray, counts: np.ndarray, params: qparams.QParams) -> float:
    """The share of values (`levels` seen `counts` times) off their grid point."""
    scale = float(np.asarray(params.scale).reshape(-1)[0])
    if not scale > 0.0:
        return 0.0
    info = np.iinfo(params.dtype)
    zero = float(np.asarray(params.zero_point).reshape(-1)[0])
    low, high = (info.min - zero) * scale, (info.max - zero) * scale
    inside = (levels >= low) & (levels <= high)
    if not inside.any():
        return 0.0
    levels, counts = levels[inside], counts[inside]
    grid = qparams.dequantize(qparams.quantize(levels, params), params)
    off = np.abs(levels.astype(np.float64) - grid.astype(np.float64)) >= OFF_GRID_STEPS * scale
    return float(counts[off].sum() / counts.sum())


def first_readers(model: ir.Model, inputs: Sequence[str]) -> tuple[str, ...]:
    """The nodes that read `inputs`, through pass-through ops, in graph order.

    A Transpose or Reshape between the input and its first layer moves the values
    unchanged, so the layer after it reads them on the same lattice: both are named, the
    pass-through op so that it stays float and hands the layer the float values.
    """
    wanted = {value for value in model.graph.inputs if value.name in set(inputs)}
    names: set[str] = set()
    for node in model.graph:
        if not any(value in wanted for value in node.inputs if value is not None):
            continue
        names.add(node.name or "")
        if node.op_type in ops.PASS_THROUGH:
            wanted.update(node.outputs)
    return tuple(node.name or "" for node in model.graph if (node.name or "") in names)
