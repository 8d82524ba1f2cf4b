"""Small helpers over onnx_ir graphs that planning and passes share."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

HOLDERS = frozenset({"If", "Loop", "Scan"})
"""Ops that hold subgraphs (If branches, Loop and Scan bodies) whose nodes are planned,
calibrated and quantized like the main graph's."""


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's array if it is a constant initializer, not overridable as a graph input."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Registers `array` as a new initializer named `name` and returns its value."""
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        # `ir.Tensor`, not `ir.tensor`: for an array they make the same tensor, but
        # `ir.tensor` first tests it against three runtime-checkable protocols, which
        # took 3% of the default recipe's time (thousands of initializers per trial).
        const_value=ir.Tensor(np.asarray(array), name=name),
    )
    graph.register_initializer(value)
    return value


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every named value of the graph: inputs, initializers and node outputs."""
    values = {value.name: value for value in graph.inputs}
    values.update(graph.initializers)
    for node in graph:
        values.update((output.name, output) for output in node.outputs)
    return values


def body_graphs(node: ir.Node) -> list[ir.Graph]:
    """The graphs a node holds as attributes (If branches, Loop/Scan bodies)."""
    graphs: list[ir.Graph] = []
    for attribute in node.attributes.values():
        if attribute.type == ir.AttributeType.GRAPH:
            graphs.append(attribute.value)
        elif attribute.type == ir.AttributeType.GRAPHS:
            graphs.extend(attribute.value)
    return graphs


def body_nodes(node: ir.Node) -> list[ir.Node]:
    """The nodes directly inside the graphs a node holds (not those of nested holders)."""
    return [inner for graph in body_graphs(node) for inner in graph]


def subgraph_nodes(node: ir.Node) -> list[ir.Node]:
    """Every node inside the subgraphs a node holds, nested ones included."""
    return [
        inner
        for graph in body_graphs(node)
        for inner in ir.traversal.RecursiveGraphIterator(graph)
    ]


def replace_keeping_name(graph: ir.Graph, old: ir.Node, new_output: ir.Value) -> None:
    """Removes `old`; its readers read `new_output`, which takes `old`'s output name.

    Rewrites that replace a node keep its output's name: calibration statistics, override
    files and reports know the tensor by it.
    """
    replaced = old.outputs[0]
    replaced.replace_all_uses_with(new_output, replace_graph_outputs=True)
    name = replaced.name
    graph.remove(old, safe=True)
    new_output.name = name
