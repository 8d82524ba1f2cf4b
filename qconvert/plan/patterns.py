"""Graph patterns the static planner looks for: pure functions of the graph.

GELU written out with Erf, chains of Relu/Clip, outputs of global pooling, and when a
QuantizeLinear's saturation performs a clamp by itself.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qconvert import ops, qparams


def gelu_nodes(graph: ir.Graph) -> frozenset[str]:
    """The Add/Mul nodes of each GELU written out with Erf.

    Exporters write GELU as Div(x, sqrt 2) -> Erf -> Add(1) -> Mul(x) -> Mul(0.5), the
    Muls in either order. Erf and Div stay float anyway; quantizing the Add and Muls
    between them would round inside one activation function twice. On a 6-layer sentence
    encoder that cost its embeddings 0.02 of cosine similarity.
    """
    names = set()
    for erf in graph:
        if erf.op_type != "Erf":
            continue
        frontier = [erf.outputs[0]]
        for _ in range(3):  # Add(1), Mul(x), Mul(0.5) after the Erf
            step = []
            for value in frontier:
                for reader in value.consumers():
                    if reader.op_type in ("Add", "Mul") and reader.name not in names:
                        names.add(reader.name or "")
                        step.append(reader.outputs[0])
            frontier = step
    return frozenset(names)


_GLOBAL_POOLS = frozenset({"GlobalAveragePool", "GlobalMaxPool"})


def globally_pooled(value: ir.Value | None) -> bool:
    """Whether `value` is a global pooling's output, possibly reshaped."""
    while value is not None and (producer := value.producer()) is not None:
        if producer.op_type in _GLOBAL_POOLS:
            return True
        if producer.op_type not in ops.PASS_THROUGH or not producer.inputs:
            return False
        value = producer.inputs[0]
    return False


def activation_indices(node: ir.Node, rule: ops.QuantizedOpRule) -> tuple[int, ...]:
    """The indices of the node's present inputs that the table's rule calls activations."""
    if rule.activations == (ops.ALL_INPUTS,):
        indices = range(len(node.inputs))
    else:
        indices = (i for i in rule.activations if i < len(node.inputs))
    return tuple(i for i in indices if node.inputs[i] is not None)


def clamp_chain(value: ir.Value) -> list[ir.Node]:
    """The Relu/Clip nodes that follow `value` one after another, each the only reader."""
    chain = []
    while (clamp := _single_clamp_consumer(value)) is not None:
        if clamp.outputs[0].is_graph_output():
            break
        chain.append(clamp)
        value = clamp.outputs[0]
    return chain


def combined_bounds(clamps: list[ir.Node]) -> tuple[float, float] | None:
    """The bounds of applying `clamps` in turn (None if any bound is not constant)."""
    bounds = [ops.clamp_bounds(clamp) for clamp in clamps]
    if any(b is None for b in bounds):
        return None
    return max(low for low, _ in bounds), min(high for _, high in bounds)


def _single_clamp_consumer(value: ir.Value) -> ir.Node | None:
    consumers = value.consumers()
    if len(consumers) != 1 or consumers[0].op_type not in ops.CLAMPS:
        return None
    clamp = consumers[0]
    return clamp if clamp.inputs[0] is value else None


def clamp_is_exact(params: qparams.QParams, bounds: tuple[float, float] | None) -> bool:
    """True when QuantizeLinear's saturation already performs the clamp to `bounds`.

    Q(clamp(x)) == Q(x) for every x when the clamp bounds round to the saturation points:
    low / scale < qmin - zero_point + 1/2 and high / scale > qmax - zero_point - 1/2.
    """
    if bounds is None:
        return False
    low, high = bounds
    info = np.iinfo(params.dtype)
    scale, zero_point = float(params.scale), int(params.zero_point)
    return (
        low / scale < info.min - zero_point + 0.5
        and high / scale > info.max - zero_point - 0.5
    )
