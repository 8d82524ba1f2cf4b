"""The op policy table: how each op type takes part in quantization.

Three kinds of op matter to the planner:

1. Quantized ops (`QUANTIZED`): their float inputs are read through DequantizeLinear and
   their output is written through QuantizeLinear, so onnxruntime fuses each group into one
   integer kernel (QLinearConv, QLinearMatMul, QGemm, ...). The rule says which inputs are
   activations, which are weights (and along which axis a weight gets one scale per output
   channel), and which is the bias.
2. Pass-through ops (`PASS_THROUGH`): they move or select values without computing new
   ones, so their output reuses their input's parameters exactly: onnxruntime then runs
   them on int8 data with no extra rounding.
3. Clamps (`CLAMPS`): Relu and Clip right after a quantized op. Where the output's zero
   point and range make the clamp a no-op of QuantizeLinear's saturation, the clamp is
   dropped and the quantization of its output absorbs it.

Every other op stays float.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx_ir as ir


def _first_axis(node: ir.Node, rank: int) -> int:
    return 0


def _gemm_weight_axis(node: ir.Node, rank: int) -> int:
    # B is (K, N), or (N, K) with transB=1: the output channel N is the axis.
    trans_b = node.attributes.get_int("transB", 0)
    return 0 if trans_b else 1


def _last_axis(node: ir.Node, rank: int) -> int:
    return rank - 1


@dataclass(frozen=True, slots=True)
class QuantizedOpRule:
    """How one op type is quantized.

    Attributes:
        activations: indices of inputs quantized as activations (from calibration).
        weights: index of a constant input quantized as a weight, mapped to a function of
            (node, rank) giving its per-channel axis. A weight input that is not constant
            is quantized as an activation instead (as in attention's activation x
            activation MatMul).
        bias: (bias input, activation input, weight input): the bias is stored as int32
            at scale activation scale x weight scale.
    """

    activations: tuple[int, ...]
    weights: dict[int, Callable[[ir.Node, int], int]]
    bias: tuple[int, int, int] | None = None


QUANTIZED: dict[str, QuantizedOpRule] = {
    "Conv": QuantizedOpRule(activations=(0,), weights={1: _first_axis}, bias=(2, 0, 1)),
    "Gemm": QuantizedOpRule(activations=(0,), weights={1: _gemm_weight_axis}, bias=(2, 0, 1)),
    "MatMul": QuantizedOpRule(activations=(0,), weights={1: _last_axis}),
}

PASS_THROUGH: frozenset[str] = frozenset(
    {"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze"}
)

CLAMPS: frozenset[str] = frozenset({"Relu", "Clip"})


def clamp_bounds(node: ir.Node) -> tuple[float, float] | None:
    """The [low, high] a Relu or Clip node clamps to, or None if not constant."""
    if node.op_type == "Relu":
        return 0.0, float("inf")
    low, high = float("-inf"), float("inf")
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        bound = node.inputs[1].const_value
        if bound is None:
            return None
        low = float(bound.numpy())
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bound = node.inputs[2].const_value
        if bound is None:
            return None
        high = float(bound.numpy())
    # Clip before opset 11 holds its bounds as attributes.
    low = node.attributes.get_float("min", low)
    high = node.attributes.get_float("max", high)
    return low, high


def is_quantizable(op_type: str) -> bool:
    """True when the planner may quantize nodes of this type."""
    return op_type in QUANTIZED
