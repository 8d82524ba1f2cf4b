"""The pass that rewrites an `Int4Plan`'s weights, each with the writer of its form."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from qconvert.names import NameAllocator
from qconvert.passes.int4 import gather, int8_kernel, nbits, qdq, tied
from qconvert.passes.int4.common import MICROSOFT_DOMAIN, Quantizer, Writer
from qconvert.plan.int4 import BlockedWeight, Int4Plan
from qconvert.streaming import Lookahead


def _weight_key(entry: BlockedWeight) -> tuple:
    """Entries of one weight, bit width and layout share one quantization."""
    return (entry.weight, entry.bits, entry.transposed)


class WriteBlockedWeightsPass(ir.passes.InPlacePass):
    """Rewrites the planned MatMul/Gemm/Gather weights into blocked form (see the package)."""

    def __init__(
        self,
        *,
        plan: Int4Plan,
        quantize: Quantizer,
        format: str,
        accuracy_level: int,
        kernel: str = "nbits",
        input_scales: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        super().__init__()
        self.input_scales = input_scales or {}
        self.plan = plan
        self.format = format
        self.accuracy_level = accuracy_level
        self.kernel = kernel
        # one weight's result at a time, the next one's computed while this one is written
        self._source = Lookahead(quantize, _weight_key)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        out = Writer(graph, NameAllocator(graph), self.plan.scheme, self._source)
        nodes = {node.name: node for node in graph}
        written: dict[tuple, list[ir.Value | None]] = {}
        tables = {e.weight: e for e in self.plan.weights if e.op_type == "Gather"}
        tied_tables = {e.tied_to for e in self.plan.weights if e.tied_to is not None}
        shared: dict[str, ir.Value] = {}
        # a tied table read by a Gemm (transB) is dropped once both nodes are rewritten
        shapes = {
            e.weight: tuple(graph.initializers[e.weight].const_value.shape)
            for e in self.plan.weights
        }
        for entry in self.plan.weights:
            node = nodes[entry.node]
            shape = shapes[entry.weight]
            if entry.node in self.input_scales:
                _divide_input(out, node, self.input_scales[entry.node])
            key = (entry.weight, entry.bits, entry.transposed, entry.op_type == "Gather")
            table = entry.tied_to
            if entry.op_type == "Gather" and entry.weight in tied_tables:
                table = entry.weight
            if table is not None and self.format != "qdq":
                source = tables[table]
                if table not in shared:
                    shared[table] = tied.shared_codes(out, source, shapes[table])
                tied.rewrite(
                    out, node, entry, source, shared[table], shapes[table], self.accuracy_level
                )
            elif self.format == "qdq":
                if key not in written:
                    written[key] = [qdq.dequantize(out, entry, shape, node)]
                index = 0 if entry.op_type == "Gather" else 1
                node.replace_input_with(index, written[key][0])
            elif self.kernel == "int8" and int8_kernel.fits(out, entry):
                key = (*key, "int8")
                if key not in written:
                    written[key] = [int8_kernel.weight(out, entry, shape, node)]
                int8_kernel.rewrite(out, node, entry, written[key][0], shape)
            elif entry.op_type == "Gather":
                if key not in written:
                    written[key] = gather.initializers(out, entry, shape)
                gather.rewrite(out, node, entry, written[key])
            else:
                if key not in written:
                    written[key] = nbits.initializers(out, entry, shape)
                nbits.rewrite(out, node, entry, written[key], shape, self.accuracy_level)
            weight = graph.initializers.get(entry.weight)
            if weight is not None and not weight.uses() and not weight.is_graph_output():
                graph.initializers.pop(entry.weight)
        if self.plan.weights and self.format != "qdq":
            model.opset_imports.setdefault(MICROSOFT_DOMAIN, 1)
        return ir.passes.PassResult(model, modified=bool(self.plan.weights))


def _divide_input(out: Writer, node: ir.Node, scales: np.ndarray) -> None:
    """`Mul(x, 1/s)` before the node, which then reads it (AWQ-class scaling)."""
    inverse = (1.0 / scales).astype(np.float32)
    value = out.constant(f"{node.name}_input_scale", inverse)
    mul = ir.Node(
        "", "Mul", [node.inputs[0], value], name=out.names.fresh(f"{node.name}_scale")
    )
    mul.outputs[0].name = out.names.fresh(f"{node.name}_scaled_input")
    mul.outputs[0].dtype = ir.DataType.FLOAT
    out.graph.insert_before(node, mul)
    node.replace_input_with(0, mul.outputs[0])
