"""Fill in what a partly quantized model lacks: ranges for the Conv/Gemm/MatMul left float.

A QAT export may leave some compute ops float (a first or last layer kept in float during
training, an op the trainer did not wrap). With calibration data, qconvert quantizes only
those: `missing_ranges` lists the float activations such an op reads or writes, the
pipeline measures their ranges on the data, and `FillRangesPass` inserts `Q -> DQ` for
them (uint8, asymmetric) and stores the op's float weight as int8, symmetric per output
channel, the defaults of `--scheme int8`. Nothing that already has a range is touched.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from qconvert import qparams
from qconvert.graph_utils import add_initializer, constant_array
from qconvert.names import NameAllocator
from qconvert.prequantized import Ledger

COMPUTE = ("Conv", "Gemm", "MatMul")


def float_compute(model: ir.Model) -> list[ir.Node]:
    """The Conv/Gemm/MatMul nodes that read a float activation (no DequantizeLinear)."""
    return [
        node
        for node in model.graph
        if node.op_type in COMPUTE
        and not node.domain
        and node.inputs[0] is not None
        and not _dequantized(node.inputs[0])
    ]


def missing_ranges(model: ir.Model) -> list[str]:
    """The activations those nodes read and write that carry no trained range, in order."""
    names: list[str] = []
    for node in float_compute(model):
        for value in (node.inputs[0], node.outputs[0]):
            if value.name in names or _dequantized(value) or value.is_graph_output():
                continue
            if any(c.op_type == "QuantizeLinear" for c in value.consumers()):
                continue
            names.append(value.name)
        weight = node.inputs[1]
        if constant_array(weight) is None and not _dequantized(weight):
            if weight.name not in names:
                names.append(weight.name)
    return names


def _dequantized(value: ir.Value) -> bool:
    producer = value.producer()
    return producer is not None and producer.op_type == "DequantizeLinear"


class FillRangesPass(ir.passes.InPlacePass):
    """Quantizes the float compute ops with the measured `ranges` (see the module)."""

    def __init__(self, *, ranges: dict[str, tuple[float, float]], ledger: Ledger) -> None:
        super().__init__()
        self.ranges = ranges
        self.ledger = ledger

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        nodes = float_compute(model)
        values = {v.name: v for node in nodes for v in (*node.inputs, *node.outputs) if v}
        modified = False
        for name, (low, high) in self.ranges.items():
            value = values.get(name)
            if value is None:
                continue
            params = qparams.range_qparams(low, high, np.uint8, symmetric=False)
            _insert_pair(graph, names, value, params)
            self.ledger.finished.append(
                f"activation '{name}' had no trained range: quantized to uint8 with the "
                f"range measured on the data [{low:.4g}, {high:.4g}]"
            )
            modified = True
        for node in nodes:
            weight = node.inputs[1]
            array = constant_array(weight)
            if array is None or array.dtype != np.float32 or not _dequantized(node.inputs[0]):
                continue
            axis = _channel_axis(node, array)
            params = qparams.weight_qparams(array, np.int8, axis=axis)
            integers = add_initializer(
                graph, names.fresh(f"{weight.name}_q"), qparams.quantize(array, params)
            )
            scale = add_initializer(graph, names.fresh(f"{weight.name}_scale"), params.scale)
            zero = add_initializer(graph, names.fresh(f"{weight.name}_zp"), params.zero_point)
            dequantized = ir.Value(
                name=names.fresh(f"{weight.name}_dequantized"),
                type=weight.type,
                shape=weight.shape,
            )
            dequantize = ir.node(
                "DequantizeLinear",
                [integers, scale, zero],
                attributes={"axis": axis} if axis is not None else {},
                name=names.fresh(f"{weight.name}_DQ"),
                outputs=[dequantized],
            )
            graph.insert_before(node, dequantize)
            node.replace_input_with(1, dequantized)
            self.ledger.finished.append(
                f"weight '{weight.name}' of '{node.name}' had no trained range: stored as "
                "int8, symmetric per channel"
            )
            modified = True
        if modified:
            TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified=modified)


def _channel_axis(node: ir.Node, weight: np.ndarray) -> int | None:
    """The weight's output-channel axis, per channel where the model's opset allows it."""
    if weight.ndim < 2:
        return None
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    if node.op_type == "MatMul":
        return weight.ndim - 1
    return 0


def _insert_pair(
    graph: ir.Graph, names: NameAllocator, value: ir.Value, params: qparams.QParams
) -> None:
    """`value -> Q -> DQ`, every reader of `value` reading the DQ instead."""
    base = value.name or "value"
    scale = add_initializer(graph, names.fresh(f"{base}_scale"), params.scale)
    zero = add_initializer(graph, names.fresh(f"{base}_zp"), params.zero_point)
    quantized = ir.Value(name=names.fresh(f"{base}_q"), type=ir.TensorType(ir.DataType.UINT8))
    dequantized = ir.Value(
        name=names.fresh(f"{base}_dequantized"), type=value.type, shape=value.shape
    )
    readers = list(value.consumers())
    quantize = ir.node(
        "QuantizeLinear",
        [value, scale, zero],
        name=names.fresh(f"{base}_Q"),
        outputs=[quantized],
    )
    dequantize = ir.node(
        "DequantizeLinear",
        [quantized, scale, zero],
        name=names.fresh(f"{base}_DQ"),
        outputs=[dequantized],
    )
    producer = value.producer()
    if producer is not None:
        graph.insert_after(producer, [quantize, dequantize])
    else:
        graph.insert_before(next(iter(graph)), [quantize, dequantize])
    for reader in readers:
        for index, read in enumerate(reader.inputs):
            if read is value:
                reader.replace_input_with(index, dequantized)
