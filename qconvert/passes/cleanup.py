"""Final tidying before a model is written."""

from __future__ import annotations

import onnx_ir as ir


class DropIntermediateShapesPass(ir.passes.InPlacePass):
    """Forgets the inferred types and shapes of intermediate values.

    Preparation infers them for planning; written out, they become value_info entries that
    onnxruntime infers again anyway, and on a small model they weigh as much as a few
    percent of the quantized file. Graph inputs and outputs keep theirs. Initializers that
    are not graph inputs lose theirs too: their tensors already state type and dims, and a
    value_info entry for each (a few hundred scales and zero points) only repeats them.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        keep = {id(value) for value in (*graph.inputs, *graph.outputs)}
        modified = False
        outputs = [value for node in graph for value in node.outputs]
        for value in [*graph.initializers.values(), *outputs]:
            if id(value) in keep or (value.type is None and value.shape is None):
                continue
            value.type = None
            value.shape = None
            modified = True
        return ir.passes.PassResult(model, modified=modified)
