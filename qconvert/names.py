"""One allocator for every name a pass adds, so new names never collide with old ones."""

from __future__ import annotations

import onnx_ir as ir


class NameAllocator:
    """Hands out value and node names not yet used anywhere in a graph or its subgraphs."""

    def __init__(self, graph: ir.Graph) -> None:
        self._taken: set[str] = set()
        for value in graph.inputs:
            self._taken.add(value.name or "")
        self._taken.update(graph.initializers)
        for node in ir.traversal.RecursiveGraphIterator(graph):
            self._taken.add(node.name or "")
            self._taken.update(output.name or "" for output in node.outputs)

    def fresh(self, base: str) -> str:
        """`base` if it is free, else `base_1`, `base_2`, ..."""
        name, counter = base, 0
        while name in self._taken:
            counter += 1
            name = f"{base}_{counter}"
        self._taken.add(name)
        return name
