"""A linear layer's bias written as a row, (1, N), becomes the vector (N,) it stands for.

Exporters that go through TensorFlow (jax2tf, tf2onnx) write a Dense layer as
`MatMul(x, W) -> Add(bias)` with the bias reshaped to (1, N). For a MatMul output of
rank 2, adding (1, N) and adding (N,) give the same numbers and the same shape.

Quantization needs the vector: a layer whose output only float ops read (a classifier's
logits) keeps no QuantizeLinear after it, and stores its bias as int32 at scale input x
weight (`plan/weights._bias_add`). onnxruntime then runs DQ -> MatMul -> Add(DQ(int32))
as one QGemm that writes float. The int32 bias must be 1-D: its DequantizeLinear has one
scale per column (axis 0), and a Reshape after it would not be folded (onnxruntime does
not constant-fold DequantizeLinear). Left as (1, N), the bias stays float, and
onnxruntime's float MatMul+Add fusion (which runs before its QDQ fusions) makes the layer
a float Gemm on weights dequantized at every run: on a 512 x 214 layer that is 195 us a
run against 8.5 us as QGemm (1 thread).

Only rank-2 outputs: that float fusion into Gemm is what makes the trap, and it takes a
2-D MatMul. On a 3-D layer (a byte classifier's first Dense, bias (1, 1, N)) the vector
bias made the pair one layer with a float bias instead (MatMulIntegerToFloat, a float Add
and a QuantizeLinear) and its eval SQNR fell from 24.9 to 22.2 dB.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qconvert.graph_utils import add_initializer, constant_array
from qconvert.names import NameAllocator


def _output_rank(matmul: ir.Node) -> int | None:
    """The rank of `matmul`'s output, if known: its own shape, else its input's."""
    shape = matmul.outputs[0].shape
    if shape is not None:
        return len(shape)
    shape = matmul.inputs[0].shape if matmul.inputs and matmul.inputs[0] is not None else None
    if shape is None:
        return None
    # A 1-D input is a vector times the matrix: the output is 1-D as well.
    return len(shape) if len(shape) >= 2 else 1


def _row_bias(matmul: ir.Node) -> tuple[ir.Node, int, np.ndarray] | None:
    """The Add reading `matmul` alone, the index of its row bias, and that bias."""
    if matmul.op_type != "MatMul" or matmul.domain not in ("", "ai.onnx"):
        return None
    weight = constant_array(matmul.inputs[1]) if len(matmul.inputs) == 2 else None
    output = matmul.outputs[0]
    consumers = output.consumers()
    if weight is None or weight.ndim != 2 or output.is_graph_output() or len(consumers) != 1:
        return None
    add = consumers[0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    index = 1 if add.inputs[0] is output else 0
    bias = constant_array(add.inputs[index])
    if (
        bias is None
        or add.inputs[1 - index] is not output
        or bias.dtype != np.float32
        or bias.shape != (1, weight.shape[-1])
        or _output_rank(matmul) != 2
    ):
        return None
    return add, index, bias


class FlattenMatMulBiasPass(ir.passes.InPlacePass):
    """Reshapes the (1, N) constant bias of a rank-2 MatMul's sole Add to (N,).

    See the module docstring for why. A bias initializer other nodes also read gets a
    1-D copy; one only this Add reads is reshaped where it is, keeping its name.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        modified = False
        for node in list(graph):
            found = _row_bias(node)
            if found is None:
                continue
            add, index, bias = found
            value = add.inputs[index]
            vector = bias.reshape(bias.shape[-1])
            if len(value.uses()) == 1 and value.name in graph.initializers:
                value.const_value = ir.Tensor(vector, name=value.name)
                value.shape = ir.Shape(vector.shape)
            else:
                copy = add_initializer(graph, names.fresh(f"{value.name}_vector"), vector)
                add.replace_input_with(index, copy)
            modified = True
        return ir.passes.PassResult(model, modified=modified)
