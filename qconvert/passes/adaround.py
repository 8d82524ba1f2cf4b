"""Adaptive rounding of MatMul/Gemm weights (AdaRound-style, Nagel et al. 2020), per layer.

Rounding each weight to its nearest grid point minimises each weight's own error, not the
layer's. With X the layer's float inputs on the calibration samples (rows) and H = X^T X,
the layer's output error for output channel o is

    || X (w_q - w) ||^2 = e^T H e,    e = w_q - w (one column of the weight)

and each weight may round down or up (e_i is its floor or ceil residual). Starting from
nearest rounding, we sweep the weights and flip one whenever that lowers e^T H e: flipping
e_i by d changes it by 2 d (H e)_i + d^2 H_ii, and H e is updated in O(K). This is the
layer-wise objective of AdaRound minimised by coordinate descent instead of its continuous
relaxation. The chosen values are written back as exact grid points, so the rewrite's
round-to-nearest gives exactly these integers. Applies to the quantized Gemm (transA = 0)
and MatMul nodes of a static plan with a constant 2-D weight, per-tensor or per-channel,
of at most `MAX_INPUTS` input features.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qconvert import qparams
from qconvert.graph_utils import constant_array
from qconvert.plan import QuantPlan, Role

SWEEPS = 4
"""Passes over the weights; flips become rare after two or three."""
MAX_INPUTS = 2048
"""Layers with more input features keep nearest rounding: each sweep costs K x K x O and
H takes K x K x 8 bytes (a 4096-wide layer: 128 MiB, minutes of sweeps)."""


@dataclass(frozen=True, slots=True)
class Rounded:
    """What adaptive rounding gained on one layer (output error energy, calibration data)."""

    node: str
    error_before: float
    error_after: float


def adaround_nodes(model: ir.Model, plan: QuantPlan) -> list[ir.Node]:
    """The quantized MatMul/Gemm nodes whose constant 2-D weight the plan quantizes."""
    quantized = {node.name for node in plan.quantized_nodes()}
    nodes = []
    for node in model.graph:
        if node.name not in quantized or node.op_type not in ("Gemm", "MatMul"):
            continue
        if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
            continue
        weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        decision = plan.tensors.get(node.inputs[1].name) if weight is not None else None
        if weight is None or weight.ndim != 2 or decision is None:
            continue
        transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
        if weight.shape[1 if transposed else 0] > MAX_INPUTS:
            continue
        if decision.role is Role.WEIGHT and len(list(node.inputs[1].uses())) == 1:
            nodes.append(node)
    return nodes


def gram_matrices(runs: Iterable[Mapping[str, np.ndarray]], names: list[str]):
    """H = X^T X of each named tensor, rows being its last-axis vectors."""
    result: dict[str, np.ndarray] = {}
    for run in runs:
        for name in names:
            values = np.asarray(run[name], dtype=np.float64)
            rows = values.reshape(-1, values.shape[-1])
            gram = np.einsum("nk,nl->kl", rows, rows)
            result[name] = result[name] + gram if name in result else gram
    return result


def adaround(
    plan: QuantPlan,
    nodes: list[ir.Node],
    grams: Mapping[str, np.ndarray],
    originals: dict[str, np.ndarray],
) -> list[Rounded]:
    """Chooses each weight's rounding (see the module docstring) and writes it back.

    The float weights it replaces are put in `originals` (by node name), for bias
    correction to measure the final rounding against.
    """
    results = []
    for node in nodes:
        gram = grams.get(node.inputs[0].name)
        if gram is None:
            continue
        weight_value = node.inputs[1]
        weight = constant_array(weight_value).astype(np.float64)
        transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
        columns = weight.T if transposed else weight  # [K, O]: column o feeds output o
        if gram.shape[0] != columns.shape[0]:
            continue
        params = plan.tensors[weight_value.name].qparams
        scale, zero = _per_column(params.scale), _per_column(params.zero_point)
        low, high = qparams.integer_range(
            params.dtype, symmetric=True, reduce_range=plan.scheme.reduce_range
        )
        ideal = columns / scale + zero
        chosen = np.clip(np.round(ideal), low, high)
        before = _energy(gram, (chosen - ideal) * scale)
        chosen = _descend(gram, ideal, chosen, scale, low, high)
        after = _energy(gram, (chosen - ideal) * scale)
        values = (chosen - zero) * scale
        values = values.T if transposed else values
        originals[node.name or ""] = constant_array(weight_value)
        weight_value.const_value = ir.tensor(values.astype(np.float32), name=weight_value.name)
        results.append(Rounded(node.name or "", before, after))
    return results


def _descend(gram, ideal, chosen, scale, low, high) -> np.ndarray:
    """Coordinate descent on e^T H e over the rounding choices, all columns at once."""
    chosen = chosen.copy()
    error = (chosen - ideal) * scale  # [K, O]
    scale = np.broadcast_to(scale, (1, chosen.shape[1]))[0]  # one per column
    h_error = gram @ error  # [K, O]
    diagonal = np.diag(gram)
    for _ in range(SWEEPS):
        flipped = 0
        for i in range(chosen.shape[0]):
            # The other way of rounding weight i: floor if it went up, ceil if it went down.
            step = np.where(chosen[i] > ideal[i], -1.0, 1.0)
            candidate = chosen[i] + step
            allowed = (candidate >= low) & (candidate <= high)
            delta = step * scale
            change = 2 * delta * h_error[i] + delta**2 * diagonal[i]
            take = allowed & (change < -1e-12 * (1 + np.abs(h_error[i] * delta)))
            if not take.any():
                continue
            moved = np.where(take, delta, 0.0)
            chosen[i] += np.where(take, step, 0.0)
            h_error += np.outer(gram[:, i], moved)
            flipped += int(take.sum())
        if not flipped:
            break
    return chosen


def _energy(gram: np.ndarray, error: np.ndarray) -> float:
    return float(np.einsum("ko,kl,lo->", error, gram, error))


def _per_column(values: np.ndarray) -> np.ndarray:
    """Per-tensor or per-output-channel parameters laid out to broadcast over [K, O]."""
    values = np.asarray(values, dtype=np.float64)
    return values.reshape(1, -1) if values.size > 1 else values.reshape(1, 1)
