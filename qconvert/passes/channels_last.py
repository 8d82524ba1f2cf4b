"""A Flatten of an integer kernel's map, read in the order onnxruntime stores the map.

onnxruntime runs its integer Conv and pooling kernels on CPU in the NHWC layout, and puts
a Transpose back to NCHW after the last of them. Where that map is flattened for a dense
layer (`Conv/MaxPool -> Q -> DQ -> Flatten -> Gemm`, a classifier's head), the Transpose
runs on every inference only so the Flatten sees channels first. A dense layer does not
care in which order it reads its inputs if its weight's input rows are put in the same
order:

    Flatten(x)[n, c*H*W + h*W + w] @ B[c*H*W + h*W + w, :]
      = Flatten(Transpose(x, 0, 2, 3, 1))[n, h*W*C + w*C + c] @ B'[h*W*C + w*C + c, :]

`FlattenChannelsLastPass` (after the QDQ rewrite) writes that Transpose on the map's
integers, between its QuantizeLinear and DequantizeLinear, and permutes the weight's
stored constants (the integers, and a scale or zero point that runs along the input
axis). onnxruntime's layout pass cancels it against its own, so the integer head reads
the NHWC map as it lies; the products and their int32 sums are the same numbers. On a
float head the sum only changes its order.

It applies where the Flatten (axis 1) reads a per-tensor 8-bit DequantizeLinear (its only
reader) of a rank-4 map with known C, H, W, written through a QuantizeLinear by an op
onnxruntime runs as an NHWC integer kernel (a Conv, MaxPool, AveragePool or
GlobalAveragePool reading a DequantizeLinear), and every reader of the Flatten, directly
or through a per-tensor QuantizeLinear -> DequantizeLinear, is a Gemm (transA 0) or
MatMul reading it as A with a constant B read by nothing else. A map that stays NCHW (a
float kernel, 16-bit values) is left alone: there the Transpose would be one more copy.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qconvert.graph_utils import constant_array
from qconvert.names import NameAllocator

_NHWC_INTEGER_KERNELS = frozenset({"Conv", "MaxPool", "AveragePool", "GlobalAveragePool"})
"""Ops whose DequantizeLinear -> op -> QuantizeLinear group onnxruntime runs in NHWC."""

_WEIGHT_CHAIN_OPS = frozenset({"DequantizeLinear", "Cast", "Mul"})
"""Ops between a stored weight and the dense layer: they act value by value."""


class FlattenChannelsLastPass(ir.passes.InPlacePass):
    """Flattens an NHWC integer map in its stored order (see the module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        modified = False
        for flatten in list(graph):
            dims = _channels_last_map(flatten)
            if dims is None:
                continue
            layers = _dense_readers(flatten)
            if layers is None:
                continue
            order = _nhwc_order(*dims)
            weights = [_weight_constants(layer, order.size) for layer in layers]
            if any(found is None for found in weights):
                continue
            if not np.array_equal(order, np.arange(order.size)):
                for found in weights:
                    for value, axis in found:
                        _permute(value, axis, order)
            # On the integers, between the map's QuantizeLinear and DequantizeLinear: there
            # it meets onnxruntime's own Transpose, and a later finishing pass sees no
            # dequantized value moved without a range.
            dequantize = flatten.inputs[0].producer()
            integers = dequantize.inputs[0]
            transpose = ir.node(
                "Transpose",
                [integers],
                {"perm": [0, 2, 3, 1]},
                name=names.fresh(f"{flatten.name or 'flatten'}_channels_last"),
                outputs=[ir.Value(name=names.fresh(f"{integers.name}_nhwc"))],
            )
            transpose.outputs[0].type = integers.type
            graph.insert_before(dequantize, transpose)
            dequantize.replace_input_with(0, transpose.outputs[0])
            modified = True
        return ir.passes.PassResult(model, modified=modified)


def _channels_last_map(flatten: ir.Node) -> tuple[int, int, int] | None:
    """(C, H, W) of the NHWC integer map `flatten` reads, or None."""
    if flatten.op_type != "Flatten" or flatten.domain not in ("", "ai.onnx"):
        return None
    if flatten.attributes.get_int("axis", 1) != 1 or flatten.inputs[0] is None:
        return None
    x = flatten.inputs[0]
    shape = x.shape
    if shape is None or shape.rank() != 4 or x.is_graph_output() or len(x.consumers()) != 1:
        return None
    dims = [shape[i] for i in (1, 2, 3)]
    if not all(isinstance(d, int) for d in dims):
        return None
    dequantize = x.producer()
    if not _per_tensor(dequantize, "DequantizeLinear"):
        return None
    integers = dequantize.inputs[0]
    if integers.is_graph_output() or len(integers.consumers()) != 1:
        return None
    quantize = integers.producer()
    if not _per_tensor(quantize, "QuantizeLinear"):
        return None
    kernel = quantize.inputs[0].producer()
    if (
        kernel is None
        or kernel.op_type not in _NHWC_INTEGER_KERNELS
        or kernel.domain not in ("", "ai.onnx")
        or not _dequantized(kernel.inputs[0])
        or (kernel.op_type == "Conv" and not _dequantized(kernel.inputs[1]))
    ):
        return None
    return dims[0], dims[1], dims[2]


def _dense_readers(flatten: ir.Node) -> list[ir.Node] | None:
    """The Gemm/MatMul nodes that read `flatten`'s output as A, or None if another reads it."""
    output = flatten.outputs[0]
    if output.is_graph_output():
        return None
    layers: list[ir.Node] = []
    for reader in output.consumers():
        if _dense_input(reader, output):
            layers.append(reader)
        elif _per_tensor(reader, "QuantizeLinear") and not reader.outputs[0].is_graph_output():
            for dequantize in reader.outputs[0].consumers():
                if not _per_tensor(dequantize, "DequantizeLinear"):
                    return None
                if dequantize.outputs[0].is_graph_output():
                    return None
                for layer in dequantize.outputs[0].consumers():
                    if not _dense_input(layer, dequantize.outputs[0]):
                        return None
                    layers.append(layer)
        else:
            return None
    return layers or None


def _dense_input(node: ir.Node, value: ir.Value) -> bool:
    if node.domain not in ("", "ai.onnx") or node.inputs[0] is not value:
        return False
    if node.op_type == "MatMul":
        return node.inputs[1] is not value
    if node.op_type == "Gemm":
        return node.attributes.get_int("transA", 0) == 0 and node.inputs[1] is not value
    return False


def _input_axis(layer: ir.Node) -> int:
    """The axis of the layer's 2-D weight B that runs along its input (K)."""
    if layer.op_type == "Gemm" and layer.attributes.get_int("transB", 0):
        return 1
    return 0


def _weight_constants(layer: ir.Node, size: int) -> list[tuple[ir.Value, int]] | None:
    """Each constant behind the layer's B that runs along its input, with that axis.

    B is a 2-D constant, or one stored through DequantizeLinear, Cast and Mul (value by
    value); a constant whose extent along the input axis is 1 broadcasts and stays. None
    where B is anything else, is read by another node, or does not have `size` inputs.
    """
    axis = _input_axis(layer)
    weight = layer.inputs[1]
    if weight is None or weight.shape is None or weight.shape.rank() != 2:
        return None
    if weight.shape[axis] != size:
        return None
    found: list[tuple[ir.Value, int]] = []
    pending = [weight]
    while pending:
        value = pending.pop()
        if len(value.consumers()) != 1 or value.is_graph_output():
            return None
        array = constant_array(value)
        if array is not None:
            if array.ndim == 2 and array.shape[axis] == size:
                found.append((value, axis))
            elif array.ndim == 0 or (array.ndim == 2 and array.shape[axis] == 1):
                pass
            else:
                return None  # a 1-D constant: its axis depends on the reader
            continue
        producer = value.producer()
        if producer is None or producer.op_type not in _WEIGHT_CHAIN_OPS:
            return None
        if producer.op_type == "DequantizeLinear":
            if not _per_axis_along(producer, axis, size, found):
                return None
            pending.append(producer.inputs[0])
        elif producer.op_type == "Cast":
            pending.append(producer.inputs[0])
        else:
            pending.extend(producer.inputs)
    return found


def _per_axis_along(dequantize: ir.Node, axis: int, size: int, found: list) -> bool:
    """Adds a DequantizeLinear's 1-D scale and zero point along `axis` to `found`.

    False for a parameter that is neither a scalar, per axis, nor constant.
    """
    dq_axis = dequantize.attributes.get_int("axis", 1)
    for value in dequantize.inputs[1:3]:
        if value is None:
            continue
        array = constant_array(value)
        if array is None or array.ndim > 1 or "block_size" in dequantize.attributes:
            return False
        if array.size > 1 and dq_axis % 2 == axis:
            if len(value.consumers()) != 1 or array.size != size:
                return False
            found.append((value, 0))
    return True


def _nhwc_order(channels: int, height: int, width: int) -> np.ndarray:
    """The NCHW flat index of each NHWC flat position."""
    return (
        np.arange(channels * height * width)
        .reshape(channels, height, width)
        .transpose(1, 2, 0)
        .reshape(-1)
    )


def _permute(value: ir.Value, axis: int, order: np.ndarray) -> None:
    """Stores the constant `value`'s rows (or columns) taken in `order`, in place."""
    array = np.ascontiguousarray(np.take(constant_array(value), order, axis=axis))
    value.const_value = ir.Tensor(array, name=value.name)


def _per_tensor(node: ir.Node | None, op_type: str) -> bool:
    """True for an 8-bit QuantizeLinear/DequantizeLinear with scalar constant parameters.

    8-bit only: onnxruntime has no integer kernels for 16-bit values, so their maps stay
    NCHW and a Transpose written for them would be one more copy.
    """
    if node is None or node.op_type != op_type or len(node.inputs) < 3:
        return False
    arrays = [constant_array(value) for value in node.inputs[1:3]]
    if any(array is None or array.size != 1 for array in arrays):
        return False
    return arrays[1].dtype in (np.uint8, np.int8)


def _dequantized(value: ir.Value | None) -> bool:
    producer = value.producer() if value is not None else None
    return producer is not None and producer.op_type == "DequantizeLinear"
