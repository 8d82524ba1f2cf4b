"""Apply a float16 plan: float16 compute (fp16), or float16 storage only (fp16-weights).

fp16 (`CastToFloat16Pass`), in topological order:

1. A node the plan converts reads float16: a float32 initializer at an input the op's
   schema allows in float16 is replaced by a float16 copy (values round to nearest; the
   planner kept nodes whose weights exceed 65504 float32); any other float32 value gets a
   `Cast<float16>`, one per value, shared. Its float outputs become float16. A `Cast` to
   float32 becomes a `Cast` to float16.
2. A float32 node reading a float16 value gets a `Cast<float>` in front, one per value;
   so do the outer values the subgraphs of a float32 If/Loop/Scan read.
3. With `keep_io_types`, graph inputs stay float32 (rule 1 casts them), and every float16
   graph output gets a `Cast<float>` that takes over its name. Without it, float32 graph
   inputs and outputs become float16.

fp16-weights (`StoreWeightsAsFloat16Pass`): each planned initializer W is stored as
W16 = float16(W) and read through `Cast<float>(W16)`. onnxruntime folds the Cast into a
float32 initializer when it loads the model, so it is upcast once and computes in float32:
the TensorFlow Lite "float16 quantization" behaviour. (DequantizeLinear does not take
float16 inputs, so Cast is the standard way to widen.)
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from qconvert import ops
from qconvert.graph_utils import add_initializer, subgraph_nodes
from qconvert.names import NameAllocator
from qconvert.plan import QuantPlan

_FLOAT = ir.DataType.FLOAT
_HALF = ir.DataType.FLOAT16


class CastToFloat16Pass(ir.passes.InPlacePass):
    """Converts the planned nodes to float16 compute (see the module docstring)."""

    def __init__(self, *, plan: QuantPlan, keep_io_types: bool) -> None:
        super().__init__()
        self.plan = plan
        self.keep_io_types = keep_io_types

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opset = model.opset_imports.get("", 1)
        names = NameAllocator(graph)
        converted = {node.name for node in self.plan.quantized_nodes()}
        if not self.keep_io_types:
            for value in graph.inputs:
                if value.dtype == _FLOAT:
                    value.dtype = _HALF
        halves: dict[str, ir.Value] = {}  # float32 value name -> its float16 version
        floats: dict[str, ir.Value] = {}  # float16 value name -> its float32 version
        for node in list(graph):
            if node.name in converted:
                self._to_half(graph, names, node, opset, halves)
            else:
                self._keep_float(graph, names, node, floats)
        self._fix_outputs(graph, names)
        RemoveUnusedNodesPass()(model)
        TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified=bool(converted))

    def _to_half(
        self,
        graph: ir.Graph,
        names: NameAllocator,
        node: ir.Node,
        opset: int,
        halves: dict[str, ir.Value],
    ) -> None:
        if node.op_type == "Cast":
            if node.attributes.get_int("to") == _FLOAT:
                node.attributes["to"] = ir.AttrInt64("to", _HALF)
                node.outputs[0].dtype = _HALF
            return
        for index, value in enumerate(node.inputs):
            if value is None or value.dtype != _FLOAT:
                continue
            if not ops.float16_slot(node.op_type, opset, index, output=False):
                continue
            if value.name not in halves:
                halves[value.name] = _half_version(graph, names, node, value)
            node.replace_input_with(index, halves[value.name])
        for index, value in enumerate(node.outputs):
            if value.dtype == _FLOAT and ops.float16_slot(
                node.op_type, opset, index, output=True
            ):
                value.dtype = _HALF

    def _keep_float(
        self,
        graph: ir.Graph,
        names: NameAllocator,
        node: ir.Node,
        floats: dict[str, ir.Value],
    ) -> None:
        for index, value in enumerate(node.inputs):
            if value is None or value.dtype != _HALF or value.const_value is not None:
                continue
            if value.name not in floats:
                floats[value.name] = _cast_after(graph, names, value, _FLOAT, before=node)
            node.replace_input_with(index, floats[value.name])
        # The subgraphs of a float32 If/Loop/Scan read outer values as float32 too.
        for inner in subgraph_nodes(node):
            for index, value in enumerate(inner.inputs):
                if value is None or value.dtype != _HALF or value.const_value is not None:
                    continue
                producer = value.producer()
                if (producer is None or producer.graph is not graph) and (
                    value not in graph.inputs
                ):
                    continue  # a value of the subgraph itself
                if value.name not in floats:
                    floats[value.name] = _cast_after(graph, names, value, _FLOAT, before=node)
                inner.replace_input_with(index, floats[value.name])

    def _fix_outputs(self, graph: ir.Graph, names: NameAllocator) -> None:
        if not self.keep_io_types:
            return
        for position, value in enumerate(list(graph.outputs)):
            if value.dtype != _HALF:
                continue
            name = value.name
            value.name = names.fresh(f"{name}_float16")
            cast = ir.node(
                "Cast",
                [value],
                attributes={"to": _FLOAT},
                name=names.fresh(f"{name}_Cast"),
                outputs=[ir.Value(name=name, shape=value.shape, type=ir.TensorType(_FLOAT))],
            )
            graph.append(cast)
            graph.outputs[position] = cast.outputs[0]


def _half_version(
    graph: ir.Graph, names: NameAllocator, reader: ir.Node, value: ir.Value
) -> ir.Value:
    """A float16 initializer copy of a constant, or a Cast<float16> of anything else."""
    if value.const_value is not None and not value.is_graph_input():
        array = value.const_value.numpy().astype(np.float16)
        return add_initializer(graph, names.fresh(f"{value.name}_float16"), array)
    return _cast_after(graph, names, value, _HALF, before=reader)


def _cast_after(
    graph: ir.Graph,
    names: NameAllocator,
    value: ir.Value,
    dtype: ir.DataType,
    *,
    before: ir.Node,
) -> ir.Value:
    suffix = "float16" if dtype == _HALF else "float32"
    cast = ir.node(
        "Cast",
        [value],
        attributes={"to": dtype},
        name=names.fresh(f"{value.name}_Cast_{suffix}"),
        outputs=[
            ir.Value(
                name=names.fresh(f"{value.name}_{suffix}"),
                shape=value.shape,
                type=ir.TensorType(dtype),
            )
        ],
    )
    graph.insert_before(before, cast)
    return cast.outputs[0]


class StoreWeightsAsFloat16Pass(ir.passes.InPlacePass):
    """Stores the planned initializers as float16, read through Cast<float>."""

    def __init__(self, *, plan: QuantPlan) -> None:
        super().__init__()
        self.plan = plan

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        casts = []
        for name in self.plan.float16_tensors:
            value = graph.initializers[name]
            array = value.const_value.numpy().astype(np.float16)
            stored = add_initializer(graph, names.fresh(f"{name}_float16"), array)
            widened = ir.Value(
                name=names.fresh(f"{name}_float32"),
                shape=value.shape,
                type=ir.TensorType(_FLOAT),
            )
            casts.append(
                ir.node(
                    "Cast",
                    [stored],
                    attributes={"to": _FLOAT},
                    name=names.fresh(f"{name}_Cast"),
                    outputs=[widened],
                )
            )
            value.replace_all_uses_with(widened)
            graph.initializers.pop(name)
        if casts:
            # At the head of the graph: each Cast depends on an initializer only.
            first = next(iter(graph), None)
            if first is None:
                graph.extend(casts)
            else:
                graph.insert_before(first, casts)
        return ir.passes.PassResult(model, modified=bool(casts))
