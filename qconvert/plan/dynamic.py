"""Planning int8-dynamic: the constant weights of MatMul, Gemm and the recurrent ops."""

from __future__ import annotations

from types import MappingProxyType

import numpy as np
import onnx_ir as ir

from qconvert import ops, qparams
from qconvert.graph_utils import constant_array
from qconvert.overrides import Overrides
from qconvert.plan.common import check_overrides, skip_reason
from qconvert.plan.decisions import NodeDecision, QuantPlan, Role, TensorDecision
from qconvert.schemes import (
    DynamicScheme,
)
from qconvert.selection import NodeSelection


def make_dynamic_plan(
    model: ir.Model,
    scheme: DynamicScheme,
    *,
    selection: NodeSelection | None = None,
    overrides: Overrides | None = None,
) -> QuantPlan:
    """Plans int8-dynamic: the constant 2-D weight of each MatMul and Gemm, per column.

    Activations need no plan: DynamicQuantizeLinear finds their range at run time.
    """
    selection = selection or NodeSelection()
    overrides = overrides or Overrides()
    check_overrides(model, overrides, static=False, scheme=scheme.name)
    opset = model.opset_imports.get("", 1)
    tensors: dict[str, TensorDecision] = {}
    nodes: list[NodeDecision] = []
    for node in model.graph:
        name = node.name or ""
        reason = skip_reason(node, selection, overrides) or _dynamic_refusal(node)
        if reason is not None:
            nodes.append(NodeDecision(name, node.op_type, False, reason))
            continue
        weights = {"LSTM": node.inputs[1:3], "Gather": node.inputs[0:1]}.get(
            node.op_type, node.inputs[1:2]
        )
        for weight in weights:
            if weight.name not in tensors:
                tensors[weight.name] = _dynamic_weight(node, weight, scheme, opset)
        nodes.append(NodeDecision(name, node.op_type, True, "quantized dynamically"))
    return QuantPlan(
        scheme=scheme,
        tensors=MappingProxyType(tensors),
        nodes=tuple(nodes),
        folds=(),
        format="dynamic",
        notes=_dynamic_notes(nodes),
    )


def _dynamic_notes(nodes: list[NodeDecision]) -> tuple[str, ...]:
    done = {node.op_type for node in nodes if node.quantized}
    present = {node.op_type for node in nodes}
    notes = []
    if done & {"MatMul", "Gemm"}:
        notes.append(
            "int8-dynamic: each MatMul/Gemm with a constant weight became "
            "DynamicQuantizeLinear + MatMulInteger (uint8 activations x int8 weights) + "
            "a float rescale; onnxruntime fuses each group into one DynamicQuantizeMatMul "
            "kernel."
        )
    if "LSTM" in done:
        notes.append(
            "int8-dynamic: each LSTM became com.microsoft DynamicQuantizeLSTM (int8 W and R, "
            "X and H quantized at every step)."
        )
    if "Gather" in done:
        notes.append(
            "int8-dynamic: each embedding table read by Gather is stored as int8 (one scale "
            "per row) and read through DequantizeLinear."
        )
    if "GRU" in present:
        notes.append("int8-dynamic leaves GRU float: onnxruntime has no such kernel.")
    if "Conv" in present:
        notes.append(
            "int8-dynamic leaves Conv float: onnxruntime's ConvInteger runs several times "
            "slower than float Conv on CPU. Use --scheme int8 for conv nets."
        )
    return tuple(notes)


def _dynamic_weight(
    node: ir.Node, weight: ir.Value, scheme: DynamicScheme, opset: int
) -> TensorDecision:
    """int8 symmetric parameters of one weight of a MatMul, Gemm, LSTM or Gather.

    Gather's table: one scale per row (per-axis DequantizeLinear needs opset 13; below,
    one per table).

    MatMul/Gemm: one scale per output column (the last axis of B, the first when Gemm
    transposes it). LSTM's W and R, (directions, 4 x hidden, K): one scale per row of
    each direction (the weights are flattened to (directions x 4 x hidden, K) for that),
    or one per direction.
    """
    array = constant_array(weight)
    name = node.name or ""
    if node.op_type == "Gather":
        axis = 0 if scheme.per_channel and opset >= 13 else None
        granularity = "per row" if axis is not None else "per tensor"
    elif node.op_type == "LSTM":
        if scheme.per_channel:
            array = array.reshape(-1, array.shape[-1])
        axis: int | None = 0
        granularity = "per row" if scheme.per_channel else "per direction"
    elif scheme.per_channel:
        axis = 0 if node.attributes.get_int("transB", 0) else 1
        granularity = "per column"
    else:
        axis, granularity = None, "per tensor"
    params = qparams.weight_qparams(
        array, scheme.weight_dtype, axis=axis, reduce_range=scheme.reduce_range
    )
    return TensorDecision(weight.name, Role.WEIGHT, params, f"weight of {name}, {granularity}")


def _dynamic_refusal(node: ir.Node) -> str | None:
    """Why int8-dynamic leaves this node float, or None when it quantizes it."""
    if node.op_type in ops.DYNAMIC_FLOAT_REASONS:
        return ops.DYNAMIC_FLOAT_REASONS[node.op_type]
    if node.op_type not in ops.DYNAMIC:
        return "not in the op table: stays float"
    if node.domain not in ("", "ai.onnx"):
        return "custom domain: stays float"
    if node.op_type == "Gather":
        table = constant_array(node.inputs[0])
        if table is None:
            return "Gather on activations: stays float"
        if table.dtype != np.float32 or table.ndim < 2:
            return "its table is not a float32 matrix: stays float"
        if any(reader.op_type != "Gather" for reader in node.inputs[0].consumers()):
            return "its table is shared with another op (tied weights): stays float"
        return None
    if node.op_type == "LSTM":
        arrays = [constant_array(v) for v in node.inputs[1:3]]
        if any(a is None or a.dtype != np.float32 or a.ndim != 3 for a in arrays):
            return "its W and R are not constant 3-D float32 tensors"
        return None
    weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None:
        return "its second input is not a constant weight (activation x activation)"
    if weight.dtype != np.float32 or weight.ndim != 2:
        return "its weight is not a 2-D float32 tensor"
    if node.inputs[0].dtype not in (None, ir.DataType.FLOAT):
        return "its input is not float32"
    if node.op_type == "Gemm":
        alpha = node.attributes.get_float("alpha", 1.0)
        if node.attributes.get_int("transA", 0) or alpha != 1:
            return "Gemm with transA or alpha != 1 stays float"
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            if constant_array(node.inputs[2]) is None:
                return "Gemm with a non-constant C stays float"
    return None
