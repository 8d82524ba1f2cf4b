"""The op policy table: how each op type takes part in quantization.

Four kinds of op matter to the planner:

1. Quantized ops (`QUANTIZED`): their float inputs are read through DequantizeLinear and
   their output is written through QuantizeLinear, so onnxruntime fuses each group into one
   integer kernel (the rule's `kernel`: QLinearConv, QLinearMatMul, QGemm, QLinearAdd,
   QLinearConcat, QLinearSoftmax, ...). The rule says which inputs are activations, which
   are weights (and along which axis a weight gets one scale per output channel), and which
   is the bias. Add/Mul/Concat take a constant operand as integers of the activation type.
   Ops without weights run quantized only on the integer chain (a quantized input flows
   in, and an op that can run quantized reads the output): the planner checks that.
   Gather from a constant table (an embedding) stores the table as int8 per row
   (`GATHER_EMBEDDING`); Gather on activations passes through.
2. Pass-through ops (`PASS_THROUGH`): they move or select values without computing new
   ones, so their outputs reuse their input's parameters exactly: onnxruntime then runs
   them on int8 data with no extra rounding.
3. Clamps (`CLAMPS`): Relu and Clip right after a quantized op. Where the output's zero
   point and range make the clamp a no-op of QuantizeLinear's saturation, the clamp is
   dropped and the quantization of its output absorbs it.
4. Float on purpose (`FLOAT_REASONS`): each with the reason the report gives
   (LayerNormalization, HardSwish, control flow, ...).

Every other op stays float, and the report lists it as not in the op table.

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
from dataclasses import dataclass, field
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


def _second_axis(node: ir.Node, rank: int) -> int:
    # ConvTranspose's weight is (C_in, C_out / group, k...): the output channel is axis 1.
    return 1


ALL_INPUTS = -1
"""In `activations`: every input of a variadic op (Concat)."""


@dataclass(frozen=True, slots=True)
class QuantizedOpRule:
    """How one op type is quantized.

    Attributes:
        activations: indices of inputs quantized as activations (from calibration), or
            (ALL_INPUTS,) for every input.
        weights: index of a constant input quantized as a weight, mapped to a function of
            (node, rank) giving its per-channel axis. A weight input that is not constant
            is quantized as an activation instead (as in attention's activation x
            activation MatMul).
        bias: (bias input, activation input, weight input): the bias is stored as int32
            at scale activation scale x weight scale.
        constant_operands: a constant among `activations` (Add(x, c), Mul(x, c)) is stored
            as integers with activation parameters from its own values, so both operands
            have the type the integer kernel (QLinearAdd, QLinearMul) wants.
        output: the output is quantized too. Without a quantized output there is no
            integer kernel: such an op writing a graph output stays float.
        kernel: what onnxruntime fuses the `DQ -> op -> Q` group into.
    """

    activations: tuple[int, ...]
    weights: dict[int, Callable[[ir.Node, int], int]] = field(default_factory=dict)
    bias: tuple[int, int, int] | None = None
    constant_operands: bool = False
    output: bool = True
    kernel: str = ""


_UNARY = (0,)

REQUANTIZED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})
"""Ops whose float weights onnxruntime quantizes (int8, one scale per tensor) when their
first input comes from a DequantizeLinear, its WeightBiasQuantization step: a node of
these types left float must read the float tensor, not a dequantized copy."""

FLOAT_OUTPUT_KERNELS = frozenset({"Gemm", "MatMul"})
"""Ops whose integer kernel can write its output in float: onnxruntime fuses a
DequantizeLinear -> Gemm or MatMul with constant weights and no QuantizeLinear after it
into QGemm or MatMulIntegerToFloat. (QLinearConv has no such form: a Conv needs its
output quantized to run on the integers.)"""

QUANTIZED: dict[str, QuantizedOpRule] = {
    "Conv": QuantizedOpRule(_UNARY, {1: _first_axis}, bias=(2, 0, 1), kernel="QLinearConv"),
    "ConvTranspose": QuantizedOpRule(
        _UNARY, {1: _second_axis}, bias=(2, 0, 1), kernel="none on CPU: int8 weights only"
    ),
    "Gemm": QuantizedOpRule(_UNARY, {1: _gemm_weight_axis}, bias=(2, 0, 1), kernel="QGemm"),
    "MatMul": QuantizedOpRule(_UNARY, {1: _last_axis}, kernel="QLinearMatMul"),
    "Add": QuantizedOpRule((0, 1), constant_operands=True, kernel="QLinearAdd"),
    "Mul": QuantizedOpRule((0, 1), constant_operands=True, kernel="QLinearMul"),
    "Concat": QuantizedOpRule((ALL_INPUTS,), kernel="QLinearConcat"),
    "AveragePool": QuantizedOpRule(_UNARY, kernel="QLinearAveragePool"),
    "GlobalAveragePool": QuantizedOpRule(_UNARY, kernel="QLinearGlobalAveragePool"),
    "LeakyRelu": QuantizedOpRule(_UNARY, kernel="QLinearLeakyRelu"),
    "Sigmoid": QuantizedOpRule(_UNARY, kernel="QLinearSigmoid"),
    "Softmax": QuantizedOpRule(_UNARY, kernel="QLinearSoftmax"),
}

GATHER_EMBEDDING = QuantizedOpRule(
    (), {0: _first_axis}, output=False, kernel="float Gather (table dequantized at load)"
)
"""Gather from a constant table (an embedding): the table is stored as int8, one scale per
row; the gathered rows are written in float (they usually feed a LayerNormalization)."""


def quantized_rule(node: ir.Node) -> QuantizedOpRule | None:
    """The rule that quantizes this node, or None when it is not quantized as an op."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Gather" and node.inputs and node.inputs[0] is not None:
        data = node.inputs[0]
        if data.const_value is not None and not data.is_graph_input():
            return GATHER_EMBEDDING
        return None  # Gather on activations passes quantization through
    return QUANTIZED.get(node.op_type)


PASS_THROUGH: frozenset[str] = frozenset(
    {
        "MaxPool",
        "Flatten",
        "Reshape",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Split",
        "Slice",
        "Resize",
        "Pad",
        "Gather",
        "DepthToSpace",
        "SpaceToDepth",
    }
)
"""Only input 0 (the data) carries the quantized values; the others are shapes, indices,
scales or pads. Every float output reuses input 0's parameters (Split has several)."""

QDQ_FLOAT_ISLANDS: dict[str, str] = {
    "ConvTranspose": "onnxruntime has no integer ConvTranspose on CPU: int8 weights, "
    "float arithmetic between DequantizeLinear and QuantizeLinear",
    "DepthToSpace": "onnxruntime has no integer DepthToSpace: it moves the dequantized "
    "values between DequantizeLinear and QuantizeLinear",
    "SpaceToDepth": "onnxruntime has no integer SpaceToDepth: it moves the dequantized "
    "values between DequantizeLinear and QuantizeLinear",
}
"""Ops the static schemes quantize knowing onnxruntime runs them as DQ -> op -> Q (a
float island the fusion audit reports as planned): each with why."""

INTEGER_PASS_THROUGH: frozenset[str] = frozenset(
    {"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather"}
)
"""Pass-through ops the qop format runs directly on the integers (one output, and
onnxruntime has int8/uint8 kernels for them)."""

FLOAT_REASONS: dict[str, str] = {
    "LayerNormalization": "normalizes by per-sample statistics and has no integer kernel "
    "in onnxruntime; it reads its input in float (quantizing it would only add rounding) "
    "and stays float",
    "InstanceNormalization": "normalizes by per-sample statistics and has no integer "
    "kernel in onnxruntime: stays float",
    "BatchNormalization": "not after a foldable Conv/Gemm/ConvTranspose: stays float",
    "LSTM": "recurrent, no static integer kernel in onnxruntime: its W and R are stored as "
    "int8; 8-bit schemes run them on DynamicQuantizeLSTM, 16x8 in float",
    "GRU": "recurrent, and onnxruntime has no quantized GRU kernel: stays float",
    "If": "holds subgraphs, and stays float itself: the nodes of its branches are planned",
    "Loop": "holds a subgraph, and stays float itself: the nodes of its body are planned",
    "Scan": "holds a subgraph, and stays float itself: the nodes of its body are planned",
    "HardSigmoid": "onnxruntime fuses no integer kernel for it (nor HardSwish): a Q/DQ "
    "pair would only add rounding and time, so it stays float",
    "HardSwish": "onnxruntime fuses no integer kernel for it: stays float",
    "Exp": "an unbounded output no fixed scale fits: stays float",
    "Div": "no integer kernel in onnxruntime: stays float",
    "Sub": "no integer kernel in onnxruntime: stays float",
}
"""Ops the static schemes leave float on purpose, each with the reason the report gives.
Any op in none of these tables stays float as 'not in the op table'."""

FLOAT_RUN_WEIGHTS: dict[str, tuple[int, ...]] = {"LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2)}
"""Float ops with weights and no integer kernel in onnxruntime's static schemes, by the
inputs that hold their weights: the recurrent layers' W and R, laid out [directions,
gates x hidden, input or hidden]. The static schemes still store those as int8 (one
scale per row, axis 1), dequantized once when the model loads (`passes/load_dequantize`)."""


NOT_IN_TABLE_REASON = "not in the op table: stays float"


def float_reason(node: ir.Node) -> str:
    """Why the static schemes leave a node float when no rule quantizes it."""
    if node.domain not in ("", "ai.onnx"):
        return f"custom domain '{node.domain}': stays float"
    return FLOAT_REASONS.get(node.op_type, NOT_IN_TABLE_REASON)


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
    return op_type in QUANTIZED or op_type == "Gather"


DYNAMIC: frozenset[str] = frozenset({"MatMul", "Gemm", "LSTM", "Gather"})
"""LSTM becomes onnxruntime's com.microsoft DynamicQuantizeLSTM (int8 W and R); Gather from
a constant table (embeddings) reads an int8 table through DequantizeLinear."""

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
    "BitCast": "its output type, set by an attribute, must match its input's width: stays "
    "float32",
    # A function op: onnxruntime expands it with float32 constants, which clash with float16.
    "MeanVarianceNormalization": "onnxruntime runs it in float32 only: stays float32",
    "If": "holds subgraphs, which the fp16 pass does not convert: stays float32",
    "Loop": "holds subgraphs, which the fp16 pass does not convert: stays float32",
    "Scan": "holds subgraphs, which the fp16 pass does not convert: stays float32",
}
"""Ops the fp16 scheme leaves float32, and why (after onnxconverter-common's block list)."""


_SCATTERS = frozenset({"ScatterND", "ScatterElements"})


def float16_refusal(node: ir.Node, opset: int) -> str | None:
    """Why the fp16 scheme leaves this node float32, or None when it may run in float16."""
    if node.domain not in ("", "ai.onnx"):
        return f"custom domain '{node.domain}': stays float32"
    if node.op_type in FLOAT16_KEEP_FLOAT32:
        return FLOAT16_KEEP_FLOAT32[node.op_type]
    if node.op_type in _SCATTERS and node.attributes.get_string("reduction", "none") != "none":
        return "onnxruntime has no float16 kernel for a reducing scatter: stays float32"
    values = (*node.inputs, *node.outputs)
    if any(v is not None and not isinstance(v.type, ir.TensorType | None) for v in values):
        return "reads or writes a sequence or optional (not converted): stays float32"
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
