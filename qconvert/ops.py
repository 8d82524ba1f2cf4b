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

The other schemes read their own rows:

4. int8-dynamic (`DYNAMIC`): MatMul and Gemm with a constant weight. Conv stays float on
   purpose (`DYNAMIC_FLOAT_REASONS`).
5. fp16 (`FLOAT16_KEEP_FLOAT32`): ops that stay float32, each with its reason; the ONNX
   schema decides which inputs of the others may be float16.
6. Already quantized (`QUANTIZED_MARKERS`): ops whose presence means the model was
   quantized before; quantizing it again is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import onnx
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


DYNAMIC: frozenset[str] = frozenset({"MatMul", "Gemm", "LSTM"})
"""LSTM becomes onnxruntime's com.microsoft DynamicQuantizeLSTM (int8 W and R)."""

DYNAMIC_FLOAT_REASONS: dict[str, str] = {
    "Conv": "int8-dynamic leaves Conv float: ConvInteger is slower than float on CPU",
    "GRU": "onnxruntime has no dynamically quantized GRU kernel: stays float",
}

_OVERFLOWS = "its float16 result overflows (above 65504) for moderate inputs: stays float32"
_FLOAT32_INPUTS = "takes float32-only inputs (scales, boxes, bounds): stays float32"
_RANDOM = "its output type is set by an attribute: stays float32"

FLOAT16_KEEP_FLOAT32: dict[str, str] = {
    "Exp": _OVERFLOWS,
    "Pow": _OVERFLOWS,
    "ReduceSum": _OVERFLOWS,
    "ReduceSumSquare": _OVERFLOWS,
    "ReduceL2": _OVERFLOWS,
    "ReduceLogSumExp": _OVERFLOWS,
    "ReduceProd": _OVERFLOWS,
    "CumSum": _OVERFLOWS,
    "Softplus": _OVERFLOWS,
    "Resize": _FLOAT32_INPUTS,
    "Upsample": _FLOAT32_INPUTS,
    "Range": _FLOAT32_INPUTS,
    "RoiAlign": _FLOAT32_INPUTS,
    "NonMaxSuppression": _FLOAT32_INPUTS,
    "TopK": _FLOAT32_INPUTS,
    "ConstantOfShape": _RANDOM,
    "EyeLike": _RANDOM,
    "RandomNormal": _RANDOM,
    "RandomNormalLike": _RANDOM,
    "RandomUniform": _RANDOM,
    "RandomUniformLike": _RANDOM,
    "Multinomial": _RANDOM,
    "If": "holds subgraphs, which the fp16 pass does not convert: stays float32",
    "Loop": "holds subgraphs, which the fp16 pass does not convert: stays float32",
    "Scan": "holds subgraphs, which the fp16 pass does not convert: stays float32",
}
"""Ops the fp16 scheme leaves float32, and why (after onnxconverter-common's block list)."""


def float16_refusal(node: ir.Node, opset: int) -> str | None:
    """Why the fp16 scheme leaves this node float32, or None when it may run in float16."""
    if node.domain not in ("", "ai.onnx"):
        return f"custom domain '{node.domain}': stays float32"
    if node.op_type in FLOAT16_KEEP_FLOAT32:
        return FLOAT16_KEEP_FLOAT32[node.op_type]
    if node.op_type != "Cast" and not any(float16_slots(node.op_type, opset)):
        return f"{node.op_type} has no float16 form at opset {opset}: stays float32"
    return None


@cache
def float16_slots(op_type: str, opset: int) -> tuple[bool, ...]:
    """Per formal input, then output, of the op's schema: whether it may be float16.

    The last formal parameter of a variadic op stands for all the extra ones.
    """
    try:
        schema = onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return ()
    allowed = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
    return tuple(
        "tensor(float16)" in allowed.get(p.type_str, [p.type_str])
        for p in (*schema.inputs, *schema.outputs)
    )


def float16_slot(op_type: str, opset: int, index: int, *, output: bool) -> bool:
    """Whether input (or output) `index` of `op_type` may be float16."""
    try:
        schema = onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return False
    slots = float16_slots(op_type, opset)
    params = schema.outputs if output else schema.inputs
    if not params:
        return False
    offset = len(schema.inputs) if output else 0
    position = min(index, len(params) - 1)
    return slots[offset + position]


QUANTIZED_MARKERS: frozenset[str] = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "ConvInteger",
        "MatMulInteger",
        "QGemm",
        "QLinearAdd",
        "QLinearMul",
        "QLinearConcat",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearSoftmax",
        "QAttention",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "DynamicQuantizeLSTM",
    }
)
"""Ops (ai.onnx or com.microsoft) found only in models that are already quantized."""
