"""Pad: folded into the op that reads it, or run on the integers.

Exporters of TensorFlow-style nets write "same" padding as an explicit Pad before each Conv.
Left as it is, a quantized Pad is `DequantizeLinear -> Pad -> QuantizeLinear`: onnxruntime
has no QDQ rule for Pad, so every one is a float island between two integer kernels.

`FoldPadIntoReaderPass` (preparation, on the float model) moves a constant Pad into the
`pads` attribute of each reader where the result is the same number for number:

1. Conv: its own padding is zeros, so a Pad of zeros folds: pads' = pads + Pad's spatial
   pads. (After quantization QLinearConv pads with the zero point, which stands for 0.0.)
2. AveragePool: zeros padded in front are averaged in, which the pool's own padding does
   only with count_include_pad = 1. The fold sets it, so it needs a pool whose own pads
   are zero (or that already counts them), ceil_mode 0, no dilation, and each pad below
   the kernel size (onnxruntime refuses larger pool pads).
3. MaxPool: the pool's own padding never wins a max (it acts as -inf). A Pad of -inf
   folds as is; a Pad of zeros folds when its input is known non-negative (it comes from
   Relu, a Clip with a non-negative lower bound, Sigmoid, HardSigmoid or Softmax), so
   max(window, 0) = max(window). It also needs ceil_mode 0, no dilation, pads below the
   kernel (each window then holds at least one real value), and no Indices output.
4. ConvTranspose is not folded: its `pads` crop the output, and padding its input grows
   the output by stride x pad, which would need negative pads.

Only pads on the spatial axes fold (none on batch or channels, none negative); a reader
that cannot take the fold keeps reading the Pad, which is removed once none reads it.

`PadOnIntegersPass` (after the QDQ rewrite) runs every Pad left between a DequantizeLinear
and a QuantizeLinear of the same parameters on the integers instead: it reads the integers,
pads with Q(value) (the zero point for a Pad of zeros) and writes the integers the
QuantizeLinear wrote. Pad only copies values and adds Q(value) where DQ -> Pad -> Q would
add round(value / scale) + zero point, so the integers are the same.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from qconvert.graph_utils import add_initializer, constant_array
from qconvert.names import NameAllocator

_NON_NEGATIVE = frozenset({"Relu", "Sigmoid", "HardSigmoid", "Softmax"})
_READERS = frozenset({"Conv", "AveragePool", "MaxPool"})
_INTEGER_TYPES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}


def _standard(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


class FoldPadIntoReaderPass(ir.passes.InPlacePass):
    """Folds a constant Pad into the pads of the Conv/AveragePool/MaxPool reading it.

    See the module docstring for the cases and their arithmetic.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opset = model.opset_imports.get("", 1)
        modified = False
        for pad in list(graph):
            if pad.op_type != "Pad" or not _standard(pad) or not pad.inputs:
                continue
            spec = _constant_pad(pad, opset)
            if spec is None or pad.outputs[0].is_graph_output():
                continue
            begin, end, value = spec
            source = pad.inputs[0]
            for reader in list(pad.outputs[0].consumers()):
                if _fold(reader, pad.outputs[0], source, begin, end, value):
                    modified = True
            if not pad.outputs[0].consumers():
                graph.remove(pad, safe=True)
        if modified:
            RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=modified)


def _constant_pad(pad: ir.Node, opset: int) -> tuple[list[int], list[int], float] | None:
    """(spatial begin pads, spatial end pads, value) of a constant Pad on N, C, spatial axes.

    None when the Pad is not that: another mode, pads or value not constant, pads on the
    batch or channel axis, negative pads (crops).
    """
    if pad.attributes.get_string("mode", "constant") != "constant":
        return None
    if opset < 11:
        pads = pad.attributes.get_ints("pads", None)
        value = pad.attributes.get_float("value", 0.0)
        axes = None
    else:
        pads = constant_array(pad.inputs[1]) if len(pad.inputs) > 1 else None
        value = 0.0
        if len(pad.inputs) > 2 and pad.inputs[2] is not None:
            constant = constant_array(pad.inputs[2])
            if constant is None or constant.size != 1:
                return None
            value = float(constant.reshape(()))
        axes = None
        if len(pad.inputs) > 3 and pad.inputs[3] is not None:
            axes = constant_array(pad.inputs[3])
            if axes is None:
                return None
    if pads is None:
        return None
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    count = len(pads) // 2
    if axes is not None:
        rank = pad.inputs[0].shape.rank() if pad.inputs[0].shape is not None else None
        if rank is None:
            return None
        full = [0] * (2 * rank)
        for index, axis in enumerate(int(a) % rank for a in axes.reshape(-1)):
            full[axis], full[axis + rank] = pads[index], pads[index + count]
        pads, count = full, rank
    if count < 3 or any(p < 0 for p in pads):
        return None
    begin, end = pads[:count], pads[count:]
    if begin[:2] != [0, 0] or end[:2] != [0, 0]:
        return None
    return begin[2:], end[2:], value


def _fold(
    reader: ir.Node,
    padded: ir.Value,
    source: ir.Value,
    begin: list[int],
    end: list[int],
    value: float,
) -> bool:
    """Makes `reader` read `source` with the padding in its own pads, where identical."""
    if (
        reader.op_type not in _READERS
        or not _standard(reader)
        or reader.inputs[0] is not padded
    ):
        return False
    if any(index > 0 and v is padded for index, v in enumerate(reader.inputs)):
        return False
    if reader.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return False
    spatial = len(begin)
    own = list(reader.attributes.get_ints("pads", [0] * (2 * spatial)))
    if reader.attributes.get_string("auto_pad", "NOTSET") == "VALID":
        own = [0] * (2 * spatial)
    if len(own) != 2 * spatial:
        return False
    merged = [a + b for a, b in zip(own, [*begin, *end], strict=True)]
    if reader.op_type != "Conv" and not _pool_folds(
        reader, padded, source, own, merged, value
    ):
        return False
    if reader.op_type == "Conv" and value != 0.0:
        return False
    reader.attributes["pads"] = ir.AttrInt64s("pads", merged)
    if "auto_pad" in reader.attributes:
        reader.attributes["auto_pad"] = ir.AttrString("auto_pad", "NOTSET")
    if reader.op_type == "AveragePool":
        reader.attributes["count_include_pad"] = ir.AttrInt64("count_include_pad", 1)
    reader.replace_input_with(0, source)
    return True


def _pool_folds(
    pool: ir.Node,
    padded: ir.Value,
    source: ir.Value,
    own: list[int],
    merged: list[int],
    value: float,
) -> bool:
    """Whether a pool computes the same with the Pad in its own pads (cases 2 and 3)."""
    kernel = pool.attributes.get_ints("kernel_shape", None)
    if kernel is None or 2 * len(kernel) != len(merged):
        return False
    if pool.attributes.get_int("ceil_mode", 0) != 0:
        return False
    if any(d != 1 for d in pool.attributes.get_ints("dilations", [1] * len(kernel))):
        return False
    spatial = len(kernel)
    if any(merged[i] >= kernel[i % spatial] for i in range(2 * spatial)):
        return False
    if pool.op_type == "AveragePool":
        counts_pads = pool.attributes.get_int("count_include_pad", 0) == 1
        return value == 0.0 and (counts_pads or not any(own))
    if len(pool.outputs) > 1 and pool.outputs[1] is not None and pool.outputs[1].consumers():
        return False
    if value == float("-inf") or value <= float(np.finfo(np.float32).min):
        return True
    return value == 0.0 and _non_negative(source)


def _non_negative(value: ir.Value) -> bool:
    """Whether `value` is written by an op whose output is never negative."""
    producer = value.producer()
    if producer is None or not _standard(producer):
        return False
    if producer.op_type in _NON_NEGATIVE:
        return True
    if producer.op_type != "Clip":
        return False
    low = producer.attributes.get_float("min", None)
    if len(producer.inputs) > 1 and producer.inputs[1] is not None:
        bound = constant_array(producer.inputs[1])
        low = float(bound.reshape(())) if bound is not None and bound.size == 1 else None
    return low is not None and low >= 0.0


class PadOnIntegersPass(ir.passes.InPlacePass):
    """Runs `DequantizeLinear -> Pad -> QuantizeLinear` as a Pad of the integers.

    See the module docstring. The DequantizeLinear stays while others read it.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        if model.opset_imports.get("", 1) < 11:
            return ir.passes.PassResult(model, modified=False)  # Pad's value is a float
        names = NameAllocator(graph)
        modified = False
        for pad in list(graph):
            if pad.op_type != "Pad" or not _standard(pad) or not pad.inputs:
                continue
            match = qdq_around(pad)
            if match is None:
                continue
            dequantize, quantize, integers, dtype = match
            value = 0.0
            if len(pad.inputs) > 2 and pad.inputs[2] is not None:
                constant = constant_array(pad.inputs[2])
                if constant is None or constant.size != 1:
                    continue
                value = float(constant.reshape(()))
            scale = float(constant_array(dequantize.inputs[1]).reshape(()))
            zero_point = int(constant_array(dequantize.inputs[2]).reshape(()))
            low, high = _INTEGER_TYPES[dtype]
            # QuantizeLinear rounds half to even, as np.rint does.
            level = int(np.clip(np.rint(value / scale) + zero_point, low, high))
            fill = add_initializer(
                graph, names.fresh(f"{pad.name}_value_q"), np.array(level, dtype=dtype)
            )
            if len(pad.inputs) < 3:
                pad.resize_inputs(3)
            pad.replace_input_with(0, integers)
            pad.replace_input_with(2, fill)
            take_place_of(graph, quantize, pad.outputs[0])
            modified = True
        if modified:
            RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=modified)


def take_place_of(graph: ir.Graph, quantize: ir.Node, output: ir.Value) -> None:
    """`output`, the same integers computed another way, replaces `quantize`'s output.

    It takes the name, type and shape of what the QuantizeLinear wrote, so its readers
    and the graph's outputs see no change; the QuantizeLinear goes.
    """
    written = quantize.outputs[0]
    name = written.name
    written.replace_all_uses_with(output, replace_graph_outputs=True)
    graph.remove(quantize, safe=True)
    output.name = name
    output.type = written.type
    output.shape = written.shape


def qdq_around(node: ir.Node) -> tuple[ir.Node, ir.Node, ir.Value, np.dtype] | None:
    """(DQ before, Q after, the integers, their type) around `node`, or None.

    That is a matching per-tensor 8-bit DequantizeLinear/QuantizeLinear pair on the node's
    first input and output, the Q its only reader (a node that only moves or copies
    values, as Pad and Resize, then writes the integers the Q wrote).
    """
    dequantize = node.inputs[0].producer() if node.inputs[0] is not None else None
    readers = node.outputs[0].consumers()
    if (
        dequantize is None
        or dequantize.op_type != "DequantizeLinear"
        or node.outputs[0].is_graph_output()
        or len(readers) != 1
        or readers[0].op_type != "QuantizeLinear"
        or readers[0].domain != dequantize.domain
    ):
        return None
    quantize = readers[0]
    if quantize.inputs[0] is not node.outputs[0] or len(dequantize.inputs) < 3:
        return None
    if len(quantize.inputs) < 3:
        return None
    arrays = [constant_array(v) for v in (*dequantize.inputs[1:3], *quantize.inputs[1:3])]
    if any(a is None or a.size != 1 for a in arrays):
        return None
    scale_in, zero_in, scale_out, zero_out = arrays
    if scale_in.dtype != scale_out.dtype or zero_in.dtype != zero_out.dtype:
        return None
    if scale_in.reshape(()) != scale_out.reshape(()) or zero_in.reshape(
        ()
    ) != zero_out.reshape(()):
        return None
    dtype = zero_in.dtype
    if dtype not in _INTEGER_TYPES or dequantize.inputs[0] is None:
        return None
    return dequantize, quantize, dequantize.inputs[0], dtype
