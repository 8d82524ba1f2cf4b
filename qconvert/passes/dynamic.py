"""Apply an int8-dynamic plan: integer MatMuls whose activations are quantized at run time.

For a MatMul (or Gemm) Y = A x W with a constant weight W, quantized ahead of time as
W ≈ (W_q - 0) * w_scale (int8, symmetric, one scale per output column or per tensor):

    A_q, a_scale, a_zero = DynamicQuantizeLinear(A)          uint8, range of A at run time
    Y_int = MatMulInteger(A_q, W_q, a_zero, w_zero)           int32 accumulators
    Y     = Cast<float>(Y_int) * (a_scale * w_scale)

because A x W ≈ ((A_q - a_zero) * a_scale) x (W_q * w_scale). This is the standard ONNX
form; onnxruntime's graph optimizer fuses each group into one `DynamicQuantizeMatMul`
kernel (com.microsoft), which is the fast path on CPU.

A Gemm (transA 0, alpha 1) becomes the same group on W (transposed when transB is set),
followed by `Add(Y, beta * C)` when it has a C.

A Gather from a constant table (an embedding) reads the table stored as int8 (one scale per
row), dequantized once when the model loads (`load_dequantize`): the file shrinks; the
gathered rows stay float.

An LSTM becomes onnxruntime's com.microsoft `DynamicQuantizeLSTM`, which quantizes X and
H at each step and multiplies them by int8 W and R. It takes W and R transposed, as
(directions, K, 4 x hidden), with scales and zero points of shape (directions, 4 x hidden)
(one per row) or (directions,) (one per direction); the other inputs are the LSTM's own.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from qconvert import qparams
from qconvert.graph_utils import add_initializer
from qconvert.names import NameAllocator
from qconvert.passes.load_dequantize import dequantized_at_load
from qconvert.passes.recurrent import replace_with_integer_lstm
from qconvert.plan import QuantPlan

_MICROSOFT = "com.microsoft"


class DynamicQuantizePass(ir.passes.InPlacePass):
    """Rewrites each planned MatMul, Gemm and LSTM as dynamic int8 (see the docstring)."""

    def __init__(self, *, plan: QuantPlan) -> None:
        super().__init__()
        self.plan = plan

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        chosen = {node.name for node in self.plan.quantized_nodes()}
        # One integer weight per (initializer, transposed), shared by every node reading it.
        stored: dict[tuple[str, bool], tuple[ir.Value, ir.Value, ir.Value]] = {}
        tables: dict[str, ir.Value] = {}  # each embedding table, dequantized at load
        modified = False
        for node in list(graph):
            if node.name not in chosen:
                continue
            if node.op_type == "LSTM":
                self._rewrite_lstm(graph, names, node)
                model.opset_imports.setdefault(_MICROSOFT, 1)
            elif node.op_type == "Gather":
                self._rewrite_gather(graph, names, node, stored, tables)
            else:
                self._rewrite(graph, names, node, stored)
            modified = True
        if modified:
            RemoveUnusedNodesPass()(model)
            TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified=modified)

    def _rewrite(
        self,
        graph: ir.Graph,
        names: NameAllocator,
        node: ir.Node,
        stored: dict[tuple[str, bool], tuple[ir.Value, ir.Value, ir.Value]],
    ) -> None:
        activation, weight = node.inputs[0], node.inputs[1]
        transposed = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
        key = (weight.name, transposed)
        if key not in stored:
            stored[key] = self._store_weight(graph, names, weight, transposed)
        weight_q, weight_scale, weight_zero = stored[key]
        base = node.name or weight.name
        quantize = ir.node(
            "DynamicQuantizeLinear",
            [activation],
            name=names.fresh(f"{base}_DynamicQuantizeLinear"),
            outputs=[
                ir.Value(name=names.fresh(f"{base}_input_quantized")),
                ir.Value(name=names.fresh(f"{base}_input_scale")),
                ir.Value(name=names.fresh(f"{base}_input_zero_point")),
            ],
        )
        a_q, a_scale, a_zero = quantize.outputs
        matmul = ir.node(
            "MatMulInteger",
            [a_q, weight_q, a_zero, weight_zero],
            name=names.fresh(f"{base}_MatMulInteger"),
            outputs=[ir.Value(name=names.fresh(f"{base}_int32"))],
        )
        cast = ir.node(
            "Cast",
            [matmul.outputs[0]],
            attributes={"to": ir.DataType.FLOAT},
            name=names.fresh(f"{base}_Cast"),
            outputs=[ir.Value(name=names.fresh(f"{base}_float"))],
        )
        scale = ir.node(
            "Mul",
            [a_scale, weight_scale],
            name=names.fresh(f"{base}_scale_Mul"),
            outputs=[ir.Value(name=names.fresh(f"{base}_scale"))],
        )
        new_nodes = [quantize, matmul, cast, scale]
        output = node.outputs[0]
        bias = _gemm_bias(node)
        rescaled = ir.Value(name=names.fresh(f"{base}_rescaled"))
        new_nodes.append(
            ir.node(
                "Mul",
                [cast.outputs[0], scale.outputs[0]],
                name=names.fresh(f"{base}_rescale_Mul"),
                outputs=[rescaled],
            )
        )
        result = rescaled
        if bias is not None:
            bias_value = add_initializer(graph, names.fresh(f"{base}_bias"), bias)
            result = ir.Value(name=names.fresh(f"{base}_biased"))
            new_nodes.append(
                ir.node(
                    "Add",
                    [rescaled, bias_value],
                    name=names.fresh(f"{base}_bias_Add"),
                    outputs=[result],
                )
            )
        # The last new value takes the node's output name, so graph outputs keep theirs.
        name, shape, type_ = output.name, output.shape, output.type
        output.replace_all_uses_with(result, replace_graph_outputs=True)
        graph.insert_after(node, new_nodes)
        graph.remove(node, safe=True)
        result.name, result.shape, result.type = name, shape, type_

    def _rewrite_gather(
        self,
        graph: ir.Graph,
        names: NameAllocator,
        node: ir.Node,
        stored: dict[tuple[str, bool], tuple[ir.Value, ir.Value, ir.Value]],
        tables: dict[str, ir.Value],
    ) -> None:
        """Gather(T, ids) -> Gather(Mul(Cast(T_q), scale), ids): an int8 table.

        The table is dequantized once, when the model loads (`load_dequantize`): dynamic
        weights are symmetric, so their zero point is 0.
        """
        table = node.inputs[0]
        if table.name not in tables:
            key = (table.name, False)
            if key not in stored:
                stored[key] = self._store_weight(graph, names, table, False)
            params = self.plan.tensors[table.name].qparams
            tables[table.name] = dequantized_at_load(
                graph, names, stored[key][0], params, table.name
            )
        node.replace_input_with(0, tables[table.name])

    def _rewrite_lstm(self, graph: ir.Graph, names: NameAllocator, node: ir.Node) -> None:
        quantized = []
        for value in node.inputs[1:3]:
            array = value.const_value.numpy()
            params = self.plan.tensors[value.name].qparams
            directions, rows, columns = array.shape
            per_row = params.scale.size == directions * rows
            flat = array.reshape(directions * rows, columns) if per_row else array
            integers = qparams.quantize(flat, params).reshape(directions, rows, columns)
            shape = (directions, rows) if per_row else (directions,)
            quantized.append(
                (
                    add_initializer(
                        graph,
                        names.fresh(f"{value.name}_quantized"),
                        np.ascontiguousarray(integers.transpose(0, 2, 1)),
                    ),
                    add_initializer(
                        graph, names.fresh(f"{value.name}_scale"), params.scale.reshape(shape)
                    ),
                    add_initializer(
                        graph,
                        names.fresh(f"{value.name}_zero_point"),
                        params.zero_point.reshape(shape),
                    ),
                )
            )
        replace_with_integer_lstm(graph, names, node, quantized, suffix="quant")

    def _store_weight(
        self, graph: ir.Graph, names: NameAllocator, weight: ir.Value, transposed: bool
    ) -> tuple[ir.Value, ir.Value, ir.Value]:
        params = self.plan.tensors[weight.name].qparams
        integers = qparams.quantize(weight.const_value.numpy(), params)
        if transposed:
            integers = np.ascontiguousarray(integers.T)  # Gemm's B^T is (K, N)
        scale = params.scale if params.axis is not None else params.scale.reshape(())
        zero = params.zero_point if params.axis is not None else params.zero_point.reshape(())
        return (
            add_initializer(graph, names.fresh(f"{weight.name}_quantized"), integers),
            add_initializer(graph, names.fresh(f"{weight.name}_scale"), scale),
            add_initializer(graph, names.fresh(f"{weight.name}_zero_point"), zero),
        )


def _gemm_bias(node: ir.Node) -> np.ndarray | None:
    """Beta * C of a Gemm, or None."""
    if node.op_type != "Gemm" or len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    beta = node.attributes.get_float("beta", 1.0)
    return (node.inputs[2].const_value.numpy() * np.float32(beta)).astype(np.float32)
