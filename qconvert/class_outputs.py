"""Which graph outputs are class scores, by the ops that write them.

A [batch, classes] float output is not always a classifier's: a sentence encoder's pooled
embedding ([1, 384], a masked mean of its hidden states) has the same shape, and the
argmax over its features decides nothing. Its top-1 agreement would veto steps for
noise, and a floor on its flips would say nothing of the embedding. Class scores are
what a layer with weights writes (logits: a Gemm, a MatMul or Conv with a constant
weight, with or without its bias Add) or a Softmax / LogSoftmax of them, through ops
that only reshape or pool them. What a normalization, a Div or a Tanh writes is not.
"""

from __future__ import annotations

import onnx_ir as ir

from qconvert.graph_utils import constant_array

_RESHAPING = frozenset(
    {
        "Identity",
        "Flatten",
        "Reshape",
        "Squeeze",
        "Unsqueeze",
        "Cast",
        "Transpose",
        "QuantizeLinear",
        "DequantizeLinear",
    }
)
"""Ops that move class scores without computing new ones (a quantized model's Q/DQ pairs
round them)."""

_POOLING = frozenset({"GlobalAveragePool", "GlobalMaxPool"})
"""A 1x1 Conv head's per-pixel scores are pooled into the class scores."""

_NORMALIZING = frozenset({"Softmax", "LogSoftmax"})
"""Scores into (log-)probabilities: what they write is class scores whatever wrote
their input."""

_LAYERS = frozenset({"Gemm", "MatMul", "Conv"})

_DEPTH = 8
"""Ops walked back from an output at most."""


def class_score_outputs(model: ir.Model) -> frozenset[str]:
    """The names of the graph outputs that are class scores (see the module docstring)."""
    return frozenset(
        output.name
        for output in model.graph.outputs
        if output.name and _writes_class_scores(output)
    )


def _writes_class_scores(value: ir.Value) -> bool:
    for _ in range(_DEPTH):
        node = value.producer()
        if node is None or not node.inputs or node.inputs[0] is None:
            return False
        if node.op_type in _NORMALIZING:
            return True
        if node.op_type in _LAYERS:
            weights = node.inputs[:2] if node.op_type == "MatMul" else node.inputs[1:2]
            return any(_is_weight(v) for v in weights)
        if node.op_type == "Add":
            # A layer's bias: the other operand is a constant.
            data = [v for v in node.inputs if v is not None and constant_array(v) is None]
            if len(data) != 1 or len(node.inputs) != 2:
                return False
            value = data[0]
            continue
        if node.op_type not in _RESHAPING and node.op_type not in _POOLING:
            return False
        value = node.inputs[0]
    return False


def _is_weight(value: ir.Value | None) -> bool:
    """A constant, or the DequantizeLinear of one (a quantized model's weight)."""
    if constant_array(value) is not None:
        return True
    node = value.producer() if value is not None else None
    return (
        node is not None
        and node.op_type == "DequantizeLinear"
        and constant_array(node.inputs[0]) is not None
    )
