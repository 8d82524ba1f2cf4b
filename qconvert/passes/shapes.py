"""Shape inference whose results are read from the inferred protobuf, not a second model.

onnx_ir's `ShapeInferencePass` serializes the model (its large initializers left out),
runs `onnx.shape_inference.infer_shapes`, then deserializes the whole inferred protobuf
into a second onnx_ir model (every node, attribute and small initializer) only to copy
each value's shape and dtype from it by name. It was the costliest step of preparation,
which runs before every calibration: 15.6 of the 56 ms of CPU it took on the bench's
text-orientation CNN, 13.2 of 34 ms on a 224x224 inverted-residual CNN. Reading the
protobuf instead took preparation to 51 and 29 ms (a text-line recognizer, a CNN then
transformer blocks: 84 -> 68 ms).

`InferShapesPass` reads the inferred types straight from the protobuf's value infos and
merges them by the same rules, so the model it leaves is the same, value for value:

1. A name takes the type the deserializer would give it: a graph input's from its input
   entry; a node output's from its `value_info` entry, then from its graph output entry,
   which wins; a graph output that is a graph input, from the output entry.
2. Every named value of the model (initializers, inputs, node inputs and outputs, the first
   of each name) whose name has an inferred type takes its shape where that is known and
   differs, and its element type likewise (setting it makes the value a tensor, as the
   stock pass does; `RestoreSequenceTypesPass` gives sequences theirs back).
3. A model with subgraphs (If, Loop, Scan bodies) goes through the stock pass: its names
   are scoped per graph, which that pass resolves.
4. A model shape inference fails on is left unchanged, with a warning, as by the stock pass.
"""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir

# `_c_api_utils` is onnx_ir's own (private) helper, imported at the top so that a move
# fails loudly rather than in `call`'s fallback: the large initializers become typed
# inputs for the call and the model is restored after it, so onnx sees the protobuf the
# stock pass hands it.
from onnx_ir.passes.common import ShapeInferencePass, _c_api_utils

logger = logging.getLogger(__name__)


class InferShapesPass(ir.passes.InPlacePass):
    """Infers shapes and element types with onnx and merges them into the model."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if any(graph is not model.graph for graph in model.graphs()):
            return ShapeInferencePass()(model)
        try:
            inferred = _inferred_proto(model)
        except Exception as exc:  # noqa: BLE001 - as the stock pass: any failure leaves it
            logger.warning("Shape inference failed: %s. Model is left unchanged", exc)
            return ir.passes.PassResult(model, False)
        types = _inferred_types(inferred.graph)
        modified = False
        for value in _named_values(model.graph):
            type_proto = types.get(value.name)
            if type_proto is None:
                continue
            shape = ir.serde.deserialize_type_proto_for_shape(type_proto)
            if shape is not None and value.shape != shape:
                value.shape = shape
                modified = True
            value_type = ir.serde.deserialize_type_proto_for_type(type_proto)
            dtype = value_type.dtype if value_type is not None else None
            if dtype is not None and value.dtype != dtype:
                value.dtype = dtype
                modified = True
        return ir.passes.PassResult(model, modified=modified)


def _inferred_proto(model: ir.Model) -> onnx.ModelProto:
    return _c_api_utils.call_onnx_api(
        lambda proto: onnx.shape_inference.infer_shapes(
            proto, check_type=True, strict_mode=True, data_prop=True
        ),
        model,
    )


def _inferred_types(graph: onnx.GraphProto) -> dict[str, onnx.TypeProto | None]:
    """Per name, the type the deserializer would give the value (None: no type)."""
    types: dict[str, onnx.TypeProto | None] = {info.name: info.type for info in graph.input}
    value_info = {info.name: info.type for info in graph.value_info}
    for node in graph.node:
        for name in node.output:
            if name:
                types[name] = value_info.get(name)
    for info in graph.output:
        if info.name in types:  # an output no node makes is no value of the graph
            types[info.name] = info.type
    return types


def _named_values(graph: ir.Graph) -> list[ir.Value]:
    """The graph's named values, the first of each name, in `create_value_mapping`'s order."""
    values: dict[str, ir.Value] = dict(graph.initializers)
    for value in graph.inputs:
        if value.name:
            values.setdefault(value.name, value)
    for node in graph:
        for value in (*node.inputs, *node.outputs):
            if value is not None and value.name:
                values.setdefault(value.name, value)
    return list(values.values())
