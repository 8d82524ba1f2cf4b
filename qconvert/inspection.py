"""What `qconvert inspect` shows: interface, ops, parameters and quantizable nodes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnx_ir as ir

from qconvert import ops
from qconvert.graph_utils import constant_array


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """A graph input or output: name, element type, shape (dynamic dims by name or '?')."""

    name: str
    dtype: str
    shape: tuple[int | str, ...] | None


@dataclass(frozen=True, slots=True)
class ModelSummary:
    """A model at a glance."""

    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    opsets: dict[str, int]
    op_histogram: dict[str, int]
    parameters: int
    parameter_bytes: int
    quantizable_nodes: tuple[str, ...]


def summarize(model: ir.Model) -> ModelSummary:
    """Collects the facts `inspect` prints."""
    graph = model.graph
    initializers = [value.const_value for value in graph.initializers.values()]
    histogram = Counter(node.op_type for node in ir.traversal.RecursiveGraphIterator(graph))
    return ModelSummary(
        inputs=tuple(_info(v) for v in graph.inputs if not v.is_initializer()),
        outputs=tuple(_info(v) for v in graph.outputs),
        opsets={
            domain or "ai.onnx": version for domain, version in model.opset_imports.items()
        },
        op_histogram=dict(histogram.most_common()),
        parameters=sum(t.size for t in initializers if t is not None),
        parameter_bytes=sum(t.nbytes for t in initializers if t is not None),
        quantizable_nodes=tuple(node.name or "" for node in graph if _quantizable(node)),
    )


def _quantizable(node: ir.Node) -> bool:
    """Whether the int8 scheme would quantize this node, judged from the graph alone."""
    rule = ops.quantized_rule(node)
    if rule is None:
        return False
    if not rule.weights:
        return True  # Add, Concat, Sigmoid, ...: activations only
    # A MatMul of two activations (attention) is quantized too; other ops need a weight.
    return node.op_type == "MatMul" or any(
        index < len(node.inputs) and constant_array(node.inputs[index]) is not None
        for index in rule.weights
    )


def _info(value: ir.Value) -> TensorInfo:
    shape = None
    if value.shape is not None:
        shape = tuple(
            d if isinstance(d, int) else (str(d) if d.value else "?") for d in value.shape
        )
    dtype = value.dtype.name.lower() if value.dtype is not None else "?"
    return TensorInfo(value.name or "", dtype, shape)
