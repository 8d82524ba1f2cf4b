"""Planning fp16 and fp16-weights.

Which nodes compute in float16 (fp16), or which initializers are stored as float16
(fp16-weights), and which stay float32 and why.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
import onnx_ir as ir

from qconvert import ops
from qconvert.graph_utils import constant_array
from qconvert.overrides import Overrides
from qconvert.plan.common import check_overrides, skip_reason
from qconvert.plan.decisions import NodeDecision, QuantPlan
from qconvert.schemes import (
    Float16Scheme,
)
from qconvert.selection import NodeSelection

FLOAT16_MAX = float(np.finfo(np.float16).max)


def make_float16_plan(
    model: ir.Model,
    scheme: Float16Scheme,
    *,
    selection: NodeSelection | None = None,
    overrides: Overrides | None = None,
    peaks: Mapping[str, float] | None = None,
) -> QuantPlan:
    """Plans fp16 (nodes computing in float16) or fp16-weights (float16 initializers).

    A node stays float32 when the op policy table blocks it (no float16 form, float32-only
    inputs, values that overflow float16), when one of its weights exceeds the float16
    range (|w| > 65504), when a tensor it reads or writes reached beyond that range on the
    data (`peaks`: the largest magnitude of each tensor, measured when data is given), or
    when the selection or an override leaves it float.
    """
    peaks = peaks or {}
    selection = selection or NodeSelection()
    overrides = overrides or Overrides()
    check_overrides(model, overrides, static=False, scheme=scheme.name)
    opset = model.opset_imports.get("", 1)
    nodes: list[NodeDecision] = []
    converted: set[str] = set()
    for node in model.graph:
        name = node.name or ""
        reason = (
            skip_reason(node, selection, overrides)
            or ops.float16_refusal(node, opset)
            or _weight_out_of_float16_range(node)
            or _beyond_float16_on_data(node, peaks)
        )
        if reason is None:
            converted.add(name)
            label = "weights stored as float16" if scheme.storage_only else "runs in float16"
            nodes.append(NodeDecision(name, node.op_type, True, label))
        else:
            nodes.append(NodeDecision(name, node.op_type, False, reason))
    stored = tuple(
        value.name
        for value in model.graph.initializers.values()
        if _storable_as_float16(value, converted)
    )
    if scheme.storage_only:
        notes = (
            "fp16-weights: float32 initializers are stored as float16 and read through "
            "Cast to float32, which onnxruntime folds once when it loads the model; "
            "the arithmetic stays float32.",
        )
    else:
        edges = (
            "inputs and outputs stay float32, with Casts at the edges"
            if scheme.keep_io_types
            else "inputs and outputs are float16"
        )
        notes = (
            f"fp16: nodes compute in float16; {edges}.",
            "onnxruntime's CPU provider has few float16 kernels and casts around the ops "
            "it lacks: fp16 pays off on GPUs; on CPUs fp16-weights gives the same file "
            "size at float32 speed.",
        )
    return QuantPlan(
        scheme=scheme,
        tensors=MappingProxyType({}),
        nodes=tuple(nodes),
        folds=(),
        format="float16",
        float16_tensors=stored,
        notes=notes,
    )


def _weight_out_of_float16_range(node: ir.Node) -> str | None:
    for value in node.inputs:
        array = constant_array(value)
        if array is not None and array.dtype == np.float32 and array.size:
            if float(np.max(np.abs(array))) > FLOAT16_MAX:
                return f"its weight '{value.name}' exceeds the float16 range (65504)"
    return None


def _beyond_float16_on_data(node: ir.Node, peaks: Mapping[str, float]) -> str | None:
    for value in (*node.inputs, *node.outputs):
        peak = peaks.get(value.name) if value is not None else None
        if peak is not None and peak > FLOAT16_MAX:
            return (
                f"'{value.name}' reaches {peak:.4g} on the data, beyond float16's 65504: "
                "stays float32"
            )
    return None


# Smaller initializers save nothing as float16, and scalars often feed shape arithmetic.
_MIN_FLOAT16_ELEMENTS = 16


def _storable_as_float16(value: ir.Value, converted: set[str]) -> bool:
    array = value.const_value
    if array is None or value.is_graph_input() or value.dtype != ir.DataType.FLOAT:
        return False
    if array.size < _MIN_FLOAT16_ELEMENTS:
        return False
    consumers = value.consumers()
    return bool(consumers) and all((node.name or "") in converted for node in consumers)
