"""Rewrite a QDQ model in the QOperator format: integer operators instead of DQ -> op -> Q.

Runs after `InsertQDQPass` and turns each group whose inputs all come from 8-bit
DequantizeLinear nodes into one integer operator:

1. `DQ(x), DQ(w), DQ(b) -> Conv -> Q(y)` becomes
   `QLinearConv(x_q, x_scale, x_zero, w_q, w_scale, w_zero, y_scale, y_zero, b_q)`.
2. `DQ(a), DQ(b) -> MatMul -> Q(y)` becomes
   `QLinearMatMul(a_q, a_scale, a_zero, b_q, b_scale, b_zero, y_scale, y_zero)`.
3. `DQ(a), DQ(b), DQ(c) -> Gemm [-> Q(y)]` becomes com.microsoft `QGemm`; without the Q
   (a graph output) QGemm writes float directly.
4. `DQ(x) -> MaxPool/Reshape/Flatten/... -> Q(y)` with the same parameters on both sides
   runs on the integers: `MaxPool(x_q) -> y_q`.
5. `DQ(a), DQ(b) -> Add/Mul -> Q(y)`, `DQ(x_i)... -> Concat -> Q(y)` and
   `DQ(x) -> AveragePool/GlobalAveragePool/LeakyRelu/Sigmoid/Softmax -> Q(y)` become
   onnxruntime's com.microsoft QLinearAdd, QLinearMul, QLinearConcat, QLinearAveragePool,
   QLinearGlobalAveragePool, QLinearLeakyRelu, QLinearSigmoid and QLinearSoftmax: the
   integers in, the output's scale and zero point as inputs, the integers out. Their
   inputs and output must share one 8-bit type and have per-tensor parameters.
6. A Conv or MatMul whose output stays float (a graph output) becomes the integer op with a
   float rescale: `ConvInteger(x_q, w_q, x_zero, 0) [+ b_q] -> Cast -> Mul(x_scale w_scale)`
   and `MatMulInteger(a_q, b_q, a_zero, b_zero) -> Cast -> Mul(a_scale b_scale)`.
   onnxruntime's ConvInteger takes only a per-tensor weight zero point; qconvert's weights
   are symmetric (zero point 0 in every channel), so one scalar 0 stands for all of them
   and the per-channel scales go into the rescale.

The integer kernels compute what the QDQ group describes: sum((x_q - x_zero) (w_q -
w_zero)) in int32, plus b_q, rescaled by x_scale w_scale / y_scale, rounded and saturated.
A group that does not match (a 16-bit tensor, a float bias, a Conv writing a graph output)
keeps its QDQ form, which onnxruntime runs as well.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from qconvert import ops
from qconvert.graph_utils import add_initializer
from qconvert.names import NameAllocator

MICROSOFT = "com.microsoft"
_EIGHT_BIT = (ir.DataType.UINT8, ir.DataType.INT8)


class QDQToQOperatorPass(ir.passes.InPlacePass):
    """Fuses QDQ groups into integer operators (see the module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        modified = False
        for node in list(graph):
            if node.op_type in _COMPUTE:
                modified |= _COMPUTE[node.op_type](graph, names, node)
            elif node.op_type in ops.INTEGER_PASS_THROUGH and len(node.outputs) == 1:
                modified |= _pass_through(node)
        if modified:
            if any(node.domain == MICROSOFT for node in graph):
                model.opset_imports.setdefault(MICROSOFT, 1)
            RemoveUnusedNodesPass()(model)
            TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified=modified)


def _dequantized(value: ir.Value | None) -> tuple[ir.Value, ...] | None:
    """The inputs of the DQ that writes `value`, when it can feed an integer operator.

    (integers, scale, zero point) for an 8-bit DQ; (integers,) for an int32 bias's DQ
    (its zero point is 0 and may be left out).
    """
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "DequantizeLinear" or producer.domain:
        return None
    integers = producer.inputs[0]
    if integers.dtype == ir.DataType.INT32:
        return (integers,)
    if integers.dtype not in _EIGHT_BIT or len(producer.inputs) < 3:
        return None
    if producer.inputs[2] is None:
        return None
    return integers, producer.inputs[1], producer.inputs[2]


def _quantized_output(node: ir.Node) -> tuple[ir.Node, ir.Value, ir.Value] | None:
    """(Q node, scale, zero point) when the node's only reader is an 8-bit Q."""
    output = node.outputs[0]
    consumers = output.consumers()
    if output.is_graph_output() or len(consumers) != 1:
        return None
    quantize = consumers[0]
    if quantize.op_type != "QuantizeLinear" or quantize.domain or len(quantize.inputs) < 3:
        return None
    if quantize.outputs[0].dtype not in _EIGHT_BIT:
        return None
    return quantize, quantize.inputs[1], quantize.inputs[2]


def _replace(graph: ir.Graph, node: ir.Node, new: ir.Node, old_output: ir.Value) -> None:
    """Puts `new` in `node`'s place; readers of `old_output` read `new`'s output."""
    new.outputs[0].shape = old_output.shape
    new.outputs[0].type = old_output.type
    graph.insert_after(node, new)
    old_output.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)


def _conv(graph: ir.Graph, names: NameAllocator, node: ir.Node) -> bool:
    x, w = _dequantized(node.inputs[0]), _dequantized(node.inputs[1])
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    b = _dequantized(bias) if bias is not None else None
    out = _quantized_output(node)
    if not _eight_bit(x, w) or (bias is not None and b is None):
        return False
    if out is None:
        return _integer_with_float_output(graph, names, node, x, w, b)
    quantize, y_scale, y_zero = out
    inputs = [*x, *w, y_scale, y_zero] + ([b[0]] if b is not None else [])
    new = ir.node(
        "QLinearConv",
        inputs,
        attributes=dict(node.attributes),
        name=names.fresh(f"{node.name}_quant"),
        outputs=[ir.Value(name=names.fresh(f"{node.outputs[0].name}_quantized"))],
    )
    _replace(graph, quantize, new, quantize.outputs[0])
    return True


def _matmul(graph: ir.Graph, names: NameAllocator, node: ir.Node) -> bool:
    a, b = _dequantized(node.inputs[0]), _dequantized(node.inputs[1])
    out = _quantized_output(node)
    if not _eight_bit(a, b):
        return False
    if out is None:
        return _integer_with_float_output(graph, names, node, a, b, None)
    quantize, y_scale, y_zero = out
    new = ir.node(
        "QLinearMatMul",
        [*a, *b, y_scale, y_zero],
        name=names.fresh(f"{node.name}_quant"),
        outputs=[ir.Value(name=names.fresh(f"{node.outputs[0].name}_quantized"))],
    )
    _replace(graph, quantize, new, quantize.outputs[0])
    return True


def _gemm(graph: ir.Graph, names: NameAllocator, node: ir.Node) -> bool:
    a, b = _dequantized(node.inputs[0]), _dequantized(node.inputs[1])
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    c = _dequantized(bias) if bias is not None else None
    if not _eight_bit(a, b) or (bias is not None and c is None):
        return False
    if node.attributes.get_float("beta", 1.0) != 1.0:
        return False
    attributes = {
        name: attr
        for name, attr in node.attributes.items()
        if name in ("alpha", "transA", "transB")
    }
    inputs: list[ir.Value | None] = [*a, *b, c[0] if c is not None else None]
    out = _quantized_output(node)
    if out is not None:
        quantize, y_scale, y_zero = out
        inputs += [y_scale, y_zero]
        replaced, old_output = quantize, quantize.outputs[0]
    else:
        replaced, old_output = node, node.outputs[0]  # QGemm writes float directly
    name = old_output.name
    new = ir.node(
        "QGemm",
        inputs,
        attributes=attributes,
        domain=MICROSOFT,
        name=names.fresh(f"{node.name}_quant"),
        outputs=[ir.Value(name=names.fresh(f"{node.outputs[0].name}_quantized"))],
    )
    _replace(graph, replaced, new, old_output)
    if out is None:
        graph.remove(node, safe=True)
        new.outputs[0].name = name  # the graph output keeps its name
    return True


def _integer_with_float_output(
    graph: ir.Graph,
    names: NameAllocator,
    node: ir.Node,
    x: tuple[ir.Value, ...],
    w: tuple[ir.Value, ...],
    bias: tuple[ir.Value, ...] | None,
) -> bool:
    """ConvInteger/MatMulInteger, plus the int32 bias, then Cast and one float rescale."""
    x_q, x_scale, x_zero = x
    w_q, w_scale, w_zero = w
    arrays = [v.const_value for v in (x_scale, w_scale, w_zero)]
    if any(a is None for a in arrays):
        return False
    x_scale_array, w_scale_array, w_zero_array = (a.numpy() for a in arrays)
    conv = node.op_type == "Conv"
    if conv and np.any(w_zero_array != 0):
        return False  # ConvInteger takes a per-tensor weight zero point only
    # The rescale broadcasts over the output channel: axis 1 of a Conv, the last of MatMul.
    rescale = (x_scale_array.astype(np.float32) * w_scale_array.astype(np.float32)).astype(
        np.float32
    )
    rank = len(node.outputs[0].shape) if node.outputs[0].shape is not None else 4
    channel_shape = (1, -1) + (1,) * (rank - 2)
    if conv and rescale.ndim == 1:
        rescale = rescale.reshape(channel_shape)
    base = node.name or "node"
    if conv:
        zero = add_initializer(
            graph, names.fresh(f"{base}_weight_zero_point"), np.zeros((), w_zero_array.dtype)
        )
        integer = ir.node(
            "ConvInteger",
            [x_q, w_q, x_zero, zero],
            attributes=dict(node.attributes),
            name=names.fresh(f"{base}_ConvInteger"),
            outputs=[ir.Value(name=names.fresh(f"{base}_int32"))],
        )
    else:
        integer = ir.node(
            "MatMulInteger",
            [x_q, w_q, x_zero, w_zero],
            name=names.fresh(f"{base}_MatMulInteger"),
            outputs=[ir.Value(name=names.fresh(f"{base}_int32"))],
        )
    new_nodes = [integer]
    accumulated = integer.outputs[0]
    if bias is not None:
        b_q = bias[0]
        if b_q.const_value is None:
            return False
        b_array = b_q.const_value.numpy().reshape(channel_shape).astype(np.int32)
        b_value = add_initializer(graph, names.fresh(f"{base}_bias_int32"), b_array)
        add = ir.node(
            "Add",
            [accumulated, b_value],
            name=names.fresh(f"{base}_bias_Add"),
            outputs=[ir.Value(name=names.fresh(f"{base}_biased_int32"))],
        )
        new_nodes.append(add)
        accumulated = add.outputs[0]
    cast = ir.node(
        "Cast",
        [accumulated],
        attributes={"to": ir.DataType.FLOAT},
        name=names.fresh(f"{base}_Cast"),
        outputs=[ir.Value(name=names.fresh(f"{base}_float"))],
    )
    scale = add_initializer(graph, names.fresh(f"{base}_rescale"), rescale)
    mul = ir.node(
        "Mul",
        [cast.outputs[0], scale],
        name=names.fresh(f"{base}_rescale_Mul"),
        outputs=[ir.Value(name=names.fresh(f"{base}_rescaled"))],
    )
    new_nodes += [cast, mul]
    output = node.outputs[0]
    name, shape, type_ = output.name, output.shape, output.type
    output.replace_all_uses_with(mul.outputs[0], replace_graph_outputs=True)
    graph.insert_after(node, new_nodes)
    graph.remove(node, safe=True)
    output.name = None
    mul.outputs[0].name, mul.outputs[0].shape, mul.outputs[0].type = name, shape, type_
    return True


def _pass_through(node: ir.Node) -> bool:
    source = _dequantized(node.inputs[0])
    out = _quantized_output(node)
    if not _eight_bit(source) or out is None:
        return False
    quantize, y_scale, y_zero = out
    if not (_same_constant(source[1], y_scale) and _same_constant(source[2], y_zero)):
        return False
    node.replace_input_with(0, source[0])
    output = node.outputs[0]
    output.type = source[0].type
    quantize.outputs[0].replace_all_uses_with(output)
    return True


def _eight_bit(*groups: tuple[ir.Value, ...] | None) -> bool:
    return all(group is not None and len(group) == 3 for group in groups)


def _same_constant(first: ir.Value, second: ir.Value) -> bool:
    if first is second:
        return True
    if first.const_value is None or second.const_value is None:
        return False
    a, b = first.const_value.numpy(), second.const_value.numpy()
    return a.dtype == b.dtype and np.array_equal(a, b)


def _contrib(kernel: str) -> Callable[[ir.Graph, NameAllocator, ir.Node], bool]:
    """The rewrite of an op into its com.microsoft QLinear `kernel` (item 5 above)."""

    def rewrite(graph: ir.Graph, names: NameAllocator, node: ir.Node) -> bool:
        sources = [_dequantized(value) for value in node.inputs]
        out = _quantized_output(node)
        if out is None or not _eight_bit(*sources) or not sources:
            return False
        quantize, y_scale, y_zero = out
        groups = [*sources, (quantize.outputs[0], y_scale, y_zero)]
        if len({group[0].dtype for group in groups}) != 1:
            return False  # one integer type throughout, as the kernels require
        if not all(_per_tensor(group[1]) for group in groups):
            return False
        attributes = _contrib_attributes(node, graph)
        if attributes is None:
            return False
        if node.op_type == "Concat":
            inputs = [y_scale, y_zero, *(v for group in sources for v in group)]
        else:
            inputs = [*(v for group in sources for v in group), y_scale, y_zero]
        new = ir.node(
            kernel,
            inputs,
            attributes=attributes,
            domain=MICROSOFT,
            name=names.fresh(f"{node.name}_quant"),
            outputs=[ir.Value(name=names.fresh(f"{node.outputs[0].name}_quantized"))],
        )
        _replace(graph, quantize, new, quantize.outputs[0])
        return True

    return rewrite


def _contrib_attributes(node: ir.Node, graph: ir.Graph) -> dict | None:
    """The kernel's attributes, or None when the op uses one the kernel lacks."""
    attributes = dict(node.attributes)
    if node.op_type == "AveragePool" and "dilations" in attributes:
        return None
    if node.op_type == "Softmax":
        opset = graph.opset_imports.get("", 1)
        # QLinearSoftmax needs the opset: before 13, Softmax coerced its input to 2-D.
        return {
            "axis": attributes.get("axis", ir.AttrInt64("axis", -1 if opset >= 13 else 1)),
            "opset": ir.AttrInt64("opset", opset),
        }
    return attributes


def _per_tensor(scale: ir.Value) -> bool:
    return scale.const_value is not None and scale.const_value.numpy().size == 1


_COMPUTE = {
    "Conv": _conv,
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Add": _contrib("QLinearAdd"),
    "Mul": _contrib("QLinearMul"),
    "Concat": _contrib("QLinearConcat"),
    "AveragePool": _contrib("QLinearAveragePool"),
    "GlobalAveragePool": _contrib("QLinearGlobalAveragePool"),
    "LeakyRelu": _contrib("QLinearLeakyRelu"),
    "Sigmoid": _contrib("QLinearSigmoid"),
    "Softmax": _contrib("QLinearSoftmax"),
}
