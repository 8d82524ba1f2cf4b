"""The per-node, per-tensor detail of a conversion, as plain data for every report format.

Three tables, each computed from the plan (and the calibration statistics, when the run
had them), never from the rewritten graph:

- `NodeRow`: every node in graph order, the precision it computes in and why;
- `ActivationRange`: per quantized activation, the range its quantization represents
  against the minimum and maximum calibration saw, and the share of calibration values
  outside that range (clipped when the model runs quantized);
- `WeightSpread`: per weight quantized per channel, how far apart its channels' ranges
  are. A wide spread is what per-channel scales absorb, and what cross-layer equalization
  (`--equalize`) evens out; per tensor, the narrow channels would get few integer levels.

The clipped share is read from the calibration histogram: bins wholly beyond the range
count in full, the bin the range cuts counts pro rata (values are assumed spread evenly
within a bin), so the share is exact to within one bin of the tensor's histogram.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from qconvert import qparams as qmath
from qconvert.calibration.observers import TensorObserver
from qconvert.plan import QuantPlan, Role
from qconvert.schemes import DynamicScheme, Float16Scheme, StaticScheme

FLOAT = "float"


@dataclass(frozen=True, slots=True)
class NodeRow:
    """One node of the graph: where it sits, what it computes in, and why.

    Attributes:
        index: the node's place in graph (topological) order, from 0.
        name: the node's name.
        op_type: the ONNX operator.
        precision: int8, int16, fp16, fp16-weights (float16 storage, float32 compute) or
            float.
        reason: why the planner quantized the node or left it float.
    """

    index: int
    name: str
    op_type: str
    precision: str
    reason: str


@dataclass(frozen=True, slots=True)
class ActivationRange:
    """A quantized activation's range against the values calibration observed.

    Attributes:
        tensor: the tensor's name.
        range_min, range_max: the real range its quantization parameters represent
            (outside it, QuantizeLinear saturates).
        observed_min, observed_max: the extremes seen on the calibration data.
        clipped: the share (0..1) of calibration values outside the range; None when the
            statistics hold no histogram (a `--method minmax` run).
        method: the range method that chose the range (`--method auto` picks per tensor).
    """

    tensor: str
    range_min: float
    range_max: float
    observed_min: float
    observed_max: float
    clipped: float | None
    method: str | None = None


@dataclass(frozen=True, slots=True)
class WeightSpread:
    """The spread of one weight's per-channel ranges.

    Attributes:
        tensor: the weight's name.
        channels: how many channels (scales) it has.
        min_range, median_range, max_range: the channels' ranges, max |w| of a channel,
            as its scale represents it.
        spread: max_range / min_range over the channels with a non-zero range.
    """

    tensor: str
    channels: int
    min_range: float
    median_range: float
    max_range: float
    spread: float


def node_rows(
    plan: QuantPlan, node_schemes: Mapping[str, str] | None = None
) -> tuple[NodeRow, ...]:
    """Every node of the plan in graph order, with its precision.

    Args:
        plan: the conversion's plan.
        node_schemes: per node name, the scheme an override file set for it (`16x8`,
            `int8`), where it differs from the run's.
    """
    node_schemes = node_schemes or {}
    default = _scheme_precision(plan)
    rows = []
    for index, node in enumerate(plan.nodes):
        if not node.quantized:
            precision = FLOAT
        elif node.name in node_schemes:
            precision = "int16" if node_schemes[node.name] == "16x8" else "int8"
        else:
            precision = default
        rows.append(NodeRow(index, node.name, node.op_type, precision, node.reason))
    return tuple(rows)


def activation_ranges(
    plan: QuantPlan,
    observers: Mapping[str, TensorObserver],
    methods: Mapping[str, str] | None = None,
) -> tuple[ActivationRange, ...]:
    """Per quantized activation with statistics, its range against the observed values."""
    methods = methods or {}
    rows = []
    for name, decision in plan.tensors.items():
        params = decision.qparams
        observer = observers.get(name)
        if decision.role is not Role.ACTIVATION or observer is None or observer.count == 0:
            continue
        if params.axis is not None or params.scale.size != 1:
            continue
        info = np.iinfo(params.dtype)
        scale = float(params.scale.reshape(-1)[0])
        zero = float(np.asarray(params.zero_point).reshape(-1)[0])
        low, high = (info.min - zero) * scale, (info.max - zero) * scale
        rows.append(
            ActivationRange(
                tensor=name,
                range_min=low,
                range_max=high,
                observed_min=float(observer.min),
                observed_max=float(observer.max),
                clipped=clipped_share(observer, low, high),
                method=methods.get(name),
            )
        )
    return tuple(rows)


def clipped_share(observer: TensorObserver, low: float, high: float) -> float | None:
    """The share of calibration values below `low` or above `high` (see module doc).

    Exactly 0 when the observed extremes lie inside; None when they do not and the
    statistics hold no histogram to count with.
    """
    if observer.count == 0 or (low <= observer.min and observer.max <= high):
        return 0.0
    total = observer.histogram_count
    if total == 0:
        return None
    width = observer.width
    starts = (observer.first_bin + np.arange(observer.bins.size)) * width
    ends = starts + width
    below = np.clip((low - starts) / width, 0.0, 1.0) if observer.min < low else 0.0
    above = np.clip((ends - high) / width, 0.0, 1.0) if observer.max > high else 0.0
    return float(np.sum(observer.bins * np.minimum(below + above, 1.0)) / total)


def weight_spreads(plan: QuantPlan) -> tuple[WeightSpread, ...]:
    """Per weight with one scale per channel, its channels' ranges, widest spread first."""
    scheme = plan.scheme
    reduce_range = bool(getattr(scheme, "reduce_range", False))
    rows = []
    for name, decision in plan.tensors.items():
        params = decision.qparams
        if decision.role is not Role.WEIGHT or params.axis is None or params.scale.size < 2:
            continue
        _, qmax = qmath.integer_range(params.dtype, symmetric=True, reduce_range=reduce_range)
        ranges = np.asarray(params.scale, dtype=np.float64).reshape(-1) * qmax
        nonzero = ranges[ranges > 0]
        spread = float(nonzero.max() / nonzero.min()) if nonzero.size else math.nan
        rows.append(
            WeightSpread(
                tensor=name,
                channels=int(ranges.size),
                min_range=float(ranges.min()),
                median_range=float(np.median(ranges)),
                max_range=float(ranges.max()),
                spread=spread,
            )
        )
    rows.sort(key=lambda row: (-row.spread if math.isfinite(row.spread) else 0.0, row.tensor))
    return tuple(rows)


def _scheme_precision(plan: QuantPlan) -> str:
    scheme = plan.scheme
    if isinstance(scheme, Float16Scheme):
        return "fp16-weights" if scheme.storage_only else "fp16"
    if isinstance(scheme, StaticScheme) and scheme.activation_dtype.itemsize == 2:
        return "int16"
    if isinstance(scheme, StaticScheme | DynamicScheme):
        return "int8"
    return str(getattr(scheme, "name", FLOAT))
