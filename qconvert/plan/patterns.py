"""Graph patterns the static planner looks for: pure functions of the graph.

GELU written out with Erf, chains of Relu/Clip, outputs of global pooling, when a
QuantizeLinear's saturation performs a clamp by itself, and the least value the ops writing
a tensor can produce (`lowest_value`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qconvert import ops, qparams
from qconvert.graph_utils import constant_array


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


_LOWEST = {"HardSwish": -0.375, "Relu": 0.0, "Sigmoid": 0.0, "HardSigmoid": 0.0}
"""The least value each op can write: HardSwish's is x (x + 3) / 6 at x = -1.5."""


def lowest_value(value: ir.Value) -> float | None:
    """The least value the ops writing `value` can produce, whatever the input, or None.

    Through Muls by positive constants and Adds of constants after a bounded op (`_LOWEST`,
    a Clip's constant min): the affine a * HardSwish(x) + b exporters write after an
    activation has its least value at b - 0.375 a, which calibration data rarely reach
    exactly (it needs x = -1.5 in the channel with the lowest b - 0.375 a).
    """
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type in _LOWEST:
        return _LOWEST[node.op_type]
    if node.op_type == "Clip":
        low = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        return float(low) if low is not None and low.size == 1 else None
    if node.op_type not in ("Mul", "Add") or len(node.inputs) != 2:
        return None
    for index in (0, 1):
        constant = constant_array(node.inputs[index])
        other = node.inputs[1 - index]
        if constant is None or other is None or constant_array(other) is not None:
            continue
        if constant.size == 0 or not np.all(np.isfinite(constant)):
            return None
        below = lowest_value(other)
        if below is None:
            return None
        if node.op_type == "Add":
            return float(np.min(below + constant.astype(np.float64)))
        if not np.all(constant > 0):
            return None
        return float(np.min(below * constant.astype(np.float64)))
    return None
