"""Finish a pre-quantized QDQ model: the trained ranges stay, the float weights go.

Each pass keeps every scale and zero point the model carries and computes the same
function; each records what it did in a `Ledger` for the report.

1. `StoreQuantizedWeightsPass`: a constant weight W read through `Q(W, s, z) -> DQ` is
   stored as its integers `W_q = saturate(round(W / s) + z)` (QuantizeLinear's own
   formula: float32 division, round half to even), read through the DQ alone. Per tensor,
   per axis and blocked (`block_size`) parameters alike; 4-, 8- and 16-bit types.
2. `FoldBatchNormIntoQuantizedPass`: `Conv(DQ(x), DQ(W_q, s)) -> BatchNormalization`
   becomes `Conv(DQ(x), DQ(W_q, s k)) [+ b']`, with k = gamma / sqrt(var + eps) per output
   channel: the integers stay, the weight scale absorbs k, b' = (b - mean) k + beta. Only
   where the trained ranges stay valid: the Conv's output feeds the BatchNormalization
   alone (no trained range sits between them) and every k is positive (a scale cannot
   flip a sign).
3. `FoldClampIntoQuantizePass`: `Relu/Clip -> Q` where Q's saturation already clamps at
   the same bounds (a uint8 zero point of 0 after a Relu): Q reads the clamp's input.
4. `PropagateRangePass`: `DQ -> MaxPool/Flatten/Reshape/... ->` an op without Q: the
   output gets `Q -> DQ` with the input's own scale and zero point. Those ops only move
   values, so the integers are exact; the next Conv, Gemm or MatMul then reads a DQ and
   runs as an integer kernel.
5. `QuantizeBiasesPass`: the float bias of a Conv or Gemm whose input and weight both come
   from 8-bit DQs is stored as int32 at input scale x weight scale, the scale integer
   kernels accumulate at (PyTorch's quantized kernels round the bias the same way). The
   change is at most half a step of that scale per output, far below the output's step.
6. `StandardQDQDomainPass` (for `--format qop`): com.microsoft QuantizeLinear and
   DequantizeLinear of 8-bit types become the ai.onnx ops they equal (per axis from opset
   13), which the integer-operator rewrite reads.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from qconvert import ops, qparams
from qconvert.graph_utils import add_initializer, constant_array
from qconvert.names import NameAllocator
from qconvert.plan.patterns import clamp_is_exact
from qconvert.prequantized import Ledger, is_qdq

_INTEGER_TYPES = {
    ir.DataType.INT4: (-8, 7),
    ir.DataType.UINT4: (0, 15),
    ir.DataType.INT8: (-128, 127),
    ir.DataType.UINT8: (0, 255),
    ir.DataType.INT16: (-(2**15), 2**15 - 1),
    ir.DataType.UINT16: (0, 2**16 - 1),
}
_EIGHT_BIT = (ir.DataType.INT8, ir.DataType.UINT8)


class TypeQuantizedValuesPass(ir.passes.InPlacePass):
    """Gives each QuantizeLinear output its integer type where the exporter left it out.

    Later passes (and the qop rewrite) tell 8-bit integers by the value's type; exporters
    rarely write value_info for intermediate tensors.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in model.graph:
            if node.op_type != "QuantizeLinear" or not is_qdq(node):
                continue
            output = node.outputs[0]
            if output.dtype is None:
                zero = constant_array(node.inputs[2]) if _has(node, 2) else None
                output.type = ir.TensorType(_output_type(node, zero))
                modified = True
        return ir.passes.PassResult(model, modified=modified)


class _LedgerPass(ir.passes.InPlacePass):
    """A finishing pass: records in `ledger` what it finished, kept and refused."""

    def __init__(self, *, ledger: Ledger) -> None:
        super().__init__()
        self.ledger = ledger


class StoreQuantizedWeightsPass(_LedgerPass):
    """Stores each constant weight behind Q -> DQ as integers (rule 1 of the module)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        modified = False
        for node in list(graph):
            if node.op_type != "QuantizeLinear" or not is_qdq(node):
                continue
            weight = node.inputs[0]
            if constant_array(weight) is None:
                if not any(
                    c.op_type == "DequantizeLinear" for c in node.outputs[0].consumers()
                ):
                    self.ledger.kept.append(
                        f"QuantizeLinear '{node.name}' has no DequantizeLinear reader: left "
                        "as it is"
                    )
                continue
            modified |= self._store(graph, names, node, weight)
        if modified:
            RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=modified)

    def _store(
        self, graph: ir.Graph, names: NameAllocator, node: ir.Node, weight: ir.Value
    ) -> bool:
        output = node.outputs[0]
        readers = [c for c in output.consumers() if c.op_type == "DequantizeLinear"]
        if not readers:
            self.ledger.kept.append(
                f"weight '{weight.name}': its QuantizeLinear '{node.name}' has no "
                "DequantizeLinear reader, left as it is"
            )
            return False
        if output.is_graph_output():
            self.ledger.kept.append(
                f"weight '{weight.name}': the integers of QuantizeLinear '{node.name}' are a "
                "graph output, left as they are"
            )
            return False
        scale = constant_array(node.inputs[1])
        zero = constant_array(node.inputs[2]) if _has(node, 2) else None
        if scale is None or (_has(node, 2) and zero is None):
            self.ledger.refused.append(
                f"weight '{weight.name}': the scale or zero point of QuantizeLinear "
                f"'{node.name}' is computed at run time, so its integers cannot be stored"
            )
            return False
        dtype = _output_type(node, zero)
        if dtype not in _INTEGER_TYPES:
            self.ledger.kept.append(
                f"weight '{weight.name}': QuantizeLinear '{node.name}' writes "
                f"{dtype.name.lower()}, which qconvert does not store; left as it is"
            )
            return False
        integers, granularity = _quantize(node, constant_array(weight), scale, zero, dtype)
        stored = ir.Value(
            name=names.fresh(f"{weight.name}_q"),
            shape=ir.Shape(integers.shape),
            type=ir.TensorType(dtype),
            const_value=ir.tensor(integers, dtype=dtype),
        )
        stored.const_value.name = stored.name
        graph.register_initializer(stored)
        output.replace_all_uses_with(stored)
        graph.remove(node, safe=True)
        dequantizers = ", ".join(f"'{reader.name}'" for reader in readers)
        self.ledger.finished.append(
            f"weight '{weight.name}' stored as {dtype.name.lower()} ({granularity}), read "
            f"through DequantizeLinear {dequantizers}"
        )
        float_readers = [c.name for c in weight.consumers() if c is not node]
        if float_readers:
            self.ledger.kept.append(
                f"weight '{weight.name}' stays float too: node '{float_readers[0]}' reads it "
                "without quantization"
            )
        return True


def _has(node: ir.Node, index: int) -> bool:
    return len(node.inputs) > index and node.inputs[index] is not None


def _output_type(node: ir.Node, zero: np.ndarray | None) -> ir.DataType:
    """The integer type a QuantizeLinear writes: its zero point's, else `output_dtype`."""
    if _has(node, 2) and node.inputs[2].dtype is not None:
        return node.inputs[2].dtype
    if zero is not None:
        return ir.DataType.from_numpy(zero.dtype)
    return ir.DataType(node.attributes.get_int("output_dtype", 0) or ir.DataType.UINT8)


def _quantize(
    node: ir.Node,
    weight: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray | None,
    dtype: ir.DataType,
) -> tuple[np.ndarray, str]:
    """QuantizeLinear on a constant, and how its parameters are laid out (for the report)."""
    axis = node.attributes.get_int("axis", 1) % max(weight.ndim, 1)
    block = node.attributes.get_int("block_size", 0)
    zero = np.zeros_like(scale, dtype=np.int64) if zero is None else zero
    if scale.size == 1:
        full_scale, full_zero = scale.reshape(()), zero.reshape(())
        granularity = "per tensor"
    elif block:
        full_scale = np.repeat(scale, block, axis=axis)[
            tuple(
                slice(0, n) if i == axis else slice(None) for i, n in enumerate(weight.shape)
            )
        ]
        full_zero = np.repeat(zero, block, axis=axis)[
            tuple(
                slice(0, n) if i == axis else slice(None) for i, n in enumerate(weight.shape)
            )
        ]
        granularity = f"blocked, axis {axis}, block {block}"
    else:
        shape = [1] * weight.ndim
        shape[axis] = -1
        full_scale, full_zero = scale.reshape(shape), zero.reshape(shape)
        granularity = f"per channel, axis {axis}"
    low, high = _INTEGER_TYPES[dtype]
    scaled = np.rint(weight.astype(np.float32) / full_scale.astype(np.float32))
    integers = np.clip(scaled + full_zero.astype(np.float32), low, high)
    return integers.astype(dtype.numpy()), granularity


class FoldBatchNormIntoQuantizedPass(_LedgerPass):
    """Folds BatchNormalization into a Conv/Gemm with a stored weight (rule 2 above)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        modified = False
        for bn in list(graph):
            if bn.op_type != "BatchNormalization" or len(bn.outputs) != 1:
                continue
            reason = self._fold(graph, names, bn, model.opset_imports.get("", 1))
            if reason is None:
                modified = True
            elif reason:
                self.ledger.kept.append(f"BatchNormalization '{bn.name}' stays: {reason}")
        if modified:
            RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=modified)

    def _fold(
        self, graph: ir.Graph, names: NameAllocator, bn: ir.Node, opset: int
    ) -> str | None:
        """Folds `bn`; returns None when done, else why not ('' for a plain float case)."""
        source = bn.inputs[0]
        producer = source.producer() if source is not None else None
        if producer is not None and producer.op_type == "DequantizeLinear":
            quantize = producer.inputs[0].producer()
            if quantize is not None and quantize.op_type == "QuantizeLinear":
                return (
                    f"its input '{source.name}' carries a trained range (QuantizeLinear "
                    f"'{quantize.name}'), which folding would invalidate"
                )
        if producer is None or producer.op_type not in ("Conv", "Gemm"):
            return ""
        weight_dq = producer.inputs[1].producer() if _has(producer, 1) else None
        if weight_dq is None or weight_dq.op_type != "DequantizeLinear":
            return ""  # a float weight: the float BatchNormalization fold handles it
        if len(source.consumers()) != 1 or source.is_graph_output():
            return f"the output of '{producer.name}' has other readers"
        if len(weight_dq.outputs[0].consumers()) != 1:
            return f"its weight's DequantizeLinear '{weight_dq.name}' has other readers"
        arrays = [constant_array(v) for v in bn.inputs[1:5]]
        scale = constant_array(weight_dq.inputs[1])
        if any(a is None for a in arrays) or scale is None:
            return "its parameters or the weight's scale are not constant"
        if producer.op_type == "Gemm" and (
            producer.attributes.get_float("alpha", 1.0) != 1.0
            or producer.attributes.get_float("beta", 1.0) != 1.0
        ):
            return f"Gemm '{producer.name}' scales by alpha or beta"
        gamma, beta, mean, var = (a.astype(np.float64) for a in arrays)
        factor = gamma / np.sqrt(var + bn.attributes.get_float("epsilon", 1e-5))
        if np.any(factor <= 0):
            return (
                "a channel's gamma is negative or zero, so the weight's integers would have "
                "to change sign"
            )
        weight = weight_dq.inputs[0]
        rank = len(weight.shape) if weight.shape is not None else 2
        channel_axis = 0
        if producer.op_type == "Gemm" and not producer.attributes.get_int("transB", 0):
            channel_axis = 1
        new_scale = _scaled(weight_dq, scale, factor, channel_axis, rank, opset)
        if isinstance(new_scale, str):
            return new_scale
        bias = None
        if _has(producer, 2):
            bias = _float_bias(producer.inputs[2])
            if bias is None:
                return f"the bias of '{producer.name}' is neither constant nor a constant DQ"
        old_bias = np.zeros_like(mean) if bias is None else bias.astype(np.float64)
        new_bias = ((old_bias - mean) * factor + beta).astype(np.float32)
        scale_value = add_initializer(
            graph, names.fresh(f"{weight_dq.inputs[1].name}_folded"), new_scale
        )
        weight_dq.replace_input_with(1, scale_value)
        if scale.size == 1 and new_scale.size > 1:
            weight_dq.attributes["axis"] = ir.AttrInt64("axis", channel_axis)
        bias_value = add_initializer(
            graph, names.fresh(f"{producer.name}_folded_bias"), new_bias
        )
        if len(producer.inputs) < 3:
            producer.resize_inputs(3)
        producer.replace_input_with(2, bias_value)
        output = bn.outputs[0]
        name = output.name
        output.replace_all_uses_with(producer.outputs[0], replace_graph_outputs=True)
        graph.remove(bn, safe=True)
        source.name = name
        self.ledger.finished.append(
            f"BatchNormalization '{bn.name}' folded into '{producer.name}': its weight keeps "
            "its integers, the scale absorbs gamma / std"
        )
        return None


def _scaled(
    dq: ir.Node, scale: np.ndarray, factor: np.ndarray, axis: int, rank: int, opset: int
) -> np.ndarray | str:
    """The weight scale times the per-channel factor, or why it cannot be written."""
    dq_axis = dq.attributes.get_int("axis", 1) % max(rank, 1)
    blocked = dq.attributes.get_int("block_size", 0)
    if scale.size == 1:
        if opset < 13 and not dq.domain:
            return "per-channel scales need opset 13"
        return (scale.reshape(()).astype(np.float64) * factor).astype(np.float32)
    if not blocked:
        if dq_axis != axis:
            return "its weight is quantized along another axis than the output channels"
        return (scale.astype(np.float64) * factor).astype(np.float32)
    if dq_axis == axis:
        return "its weight's blocks run along the output channels"
    shape = [1] * scale.ndim
    shape[axis] = -1
    return (scale.astype(np.float64) * factor.reshape(shape)).astype(np.float32)


def _float_bias(value: ir.Value) -> np.ndarray | None:
    """A bias as float: a constant, or the dequantized value of a constant int32 DQ."""
    array = constant_array(value)
    if array is not None:
        return array
    dq = value.producer()
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    integers, scale = constant_array(dq.inputs[0]), constant_array(dq.inputs[1])
    if integers is None or scale is None:
        return None
    zero = constant_array(dq.inputs[2]) if _has(dq, 2) else np.zeros((), integers.dtype)
    params = qparams.QParams(scale=scale, zero_point=zero, axis=0 if scale.size > 1 else None)
    return qparams.dequantize(integers, params)


class FoldClampIntoQuantizePass(_LedgerPass):
    """Drops a Relu/Clip whose QuantizeLinear already clamps there (rule 3 above)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for clamp in list(graph):
            if clamp.op_type not in ops.CLAMPS or clamp.outputs[0].is_graph_output():
                continue
            readers = clamp.outputs[0].consumers()
            if not readers or not all(r.op_type == "QuantizeLinear" for r in readers):
                continue
            bounds = ops.clamp_bounds(clamp)
            if not all(_clamps_exactly(quantize, bounds) for quantize in readers):
                continue
            for quantize in readers:
                quantize.replace_input_with(0, clamp.inputs[0])
            graph.remove(clamp, safe=True)
            names = ", ".join(f"'{r.name}'" for r in readers)
            self.ledger.finished.append(
                f"{clamp.op_type} '{clamp.name}' folded into QuantizeLinear {names}, whose "
                "saturation clamps at the same bounds"
            )
            modified = True
        return ir.passes.PassResult(model, modified=modified)


def _clamps_exactly(quantize: ir.Node, bounds: tuple[float, float] | None) -> bool:
    scale = constant_array(quantize.inputs[1])
    zero = constant_array(quantize.inputs[2]) if _has(quantize, 2) else None
    if scale is None or zero is None or scale.size != 1 or zero.dtype.kind not in "iu":
        return False
    params = qparams.QParams(scale=scale.reshape(()), zero_point=zero.reshape(()))
    return clamp_is_exact(params, bounds)


class PropagateRangePass(_LedgerPass):
    """Gives the output of a value-moving op its input's trained range (rule 4 above)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        modified = False
        for node in list(graph):
            if node.op_type not in ops.INTEGER_PASS_THROUGH or len(node.outputs) != 1:
                continue
            source = node.inputs[0].producer() if node.inputs and node.inputs[0] else None
            output = node.outputs[0]
            if source is None or source.op_type != "DequantizeLinear" or not is_qdq(source):
                continue
            if output.is_graph_output() or not _per_tensor_constant(source):
                continue
            readers = [c for c in output.consumers() if c.op_type != "QuantizeLinear"]
            if not readers:
                continue
            base = output.name or "value"
            quantized = ir.Value(name=names.fresh(f"{base}_q"))
            dequantized = ir.Value(name=names.fresh(f"{base}_dequantized"))
            parameters = list(source.inputs[1:])
            quantize = ir.node(
                "QuantizeLinear",
                [output, *parameters],
                domain=source.domain,
                name=names.fresh(f"{base}_Q"),
                outputs=[quantized],
            )
            dequantize = ir.node(
                "DequantizeLinear",
                [quantized, *parameters],
                domain=source.domain,
                name=names.fresh(f"{base}_DQ"),
                outputs=[dequantized],
            )
            quantized.type = source.inputs[0].type
            dequantized.type, dequantized.shape = output.type, output.shape
            graph.insert_after(node, [quantize, dequantize])
            for reader in readers:
                for index, value in enumerate(reader.inputs):
                    if value is output:
                        reader.replace_input_with(index, dequantized)
            self.ledger.finished.append(
                f"activation '{output.name}' after {node.op_type} '{node.name}' read through "
                f"the trained range of '{node.inputs[0].name}' (the op only moves values)"
            )
            modified = True
        if modified:
            TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified=modified)


def _per_tensor_constant(dq: ir.Node) -> bool:
    scale = constant_array(dq.inputs[1])
    zero = constant_array(dq.inputs[2]) if _has(dq, 2) else None
    return scale is not None and scale.size == 1 and (not _has(dq, 2) or zero is not None)


class QuantizeBiasesPass(_LedgerPass):
    """Stores float Conv/Gemm biases as int32 where both operands are 8-bit DQs (rule 5)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        opset = model.opset_imports.get("", 1)
        modified = False
        for node in list(graph):
            if node.op_type not in ("Conv", "Gemm") or not _has(node, 2):
                continue
            bias = constant_array(node.inputs[2])
            x_dq, w_dq = (v.producer() for v in node.inputs[:2])
            if bias is None or bias.ndim != 1 or not _eight_bit_dq(x_dq, w_dq):
                continue
            x_scale, w_scale = constant_array(x_dq.inputs[1]), constant_array(w_dq.inputs[1])
            if x_scale.size != 1 or (
                w_scale.size > 1 and w_dq.attributes.get_int("block_size", 0)
            ):
                continue
            if w_scale.size > 1 and opset < 13:
                continue
            params = qparams.bias_qparams(x_scale.reshape(()), w_scale.reshape(-1))
            scaled = np.rint(bias.astype(np.float64) / params.scale.astype(np.float64))
            if np.abs(scaled).max(initial=0) > qparams.BIAS_LIMIT:
                self.ledger.kept.append(
                    f"bias '{node.inputs[2].name}' of '{node.name}' stays float: at input "
                    "scale x weight scale it would overflow int32"
                )
                continue
            bias_name = node.inputs[2].name
            base = bias_name or f"{node.name}_bias"
            integers = add_initializer(
                graph, names.fresh(f"{base}_q"), scaled.astype(np.int32)
            )
            scale = add_initializer(graph, names.fresh(f"{base}_scale"), params.scale)
            attributes = {"axis": 0} if params.scale.size > 1 else {}
            dequantized = ir.Value(name=names.fresh(f"{base}_dequantized"))
            dequantize = ir.node(
                "DequantizeLinear",
                [integers, scale],
                attributes=attributes,
                name=names.fresh(f"{base}_DQ"),
                outputs=[dequantized],
            )
            dequantized.type = ir.TensorType(ir.DataType.FLOAT)
            dequantized.shape = ir.Shape(bias.shape)
            graph.insert_before(node, dequantize)
            node.replace_input_with(2, dequantized)
            self.ledger.finished.append(
                f"bias '{bias_name}' of '{node.name}' stored as int32 at input "
                "scale x weight scale, as integer kernels add it"
            )
            modified = True
        if modified:
            RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=modified)


def _eight_bit_dq(*nodes: ir.Node | None) -> bool:
    """True when each node is a DQ of stored or quantized 8-bit integers, scale constant."""
    for node in nodes:
        if node is None or node.op_type != "DequantizeLinear" or not is_qdq(node):
            return False
        if node.inputs[0].dtype not in _EIGHT_BIT or constant_array(node.inputs[1]) is None:
            return False
    return True


class StandardQDQDomainPass(_LedgerPass):
    """Writes 8-bit com.microsoft Q/DQ as the equal ai.onnx ops (rule 6 above)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opset = model.opset_imports.get("", 1)
        moved = 0
        for node in model.graph:
            if not is_qdq(node) or node.domain != "com.microsoft":
                continue
            integers = node.outputs[0] if node.op_type == "QuantizeLinear" else node.inputs[0]
            scale = constant_array(node.inputs[1])
            per_axis = scale is None or scale.size > 1
            if integers.dtype not in _EIGHT_BIT or opset < (13 if per_axis else 10):
                continue
            node.domain = ""
            moved += 1
        if moved:
            self.ledger.finished.append(
                f"{moved} com.microsoft QuantizeLinear/DequantizeLinear of 8-bit types "
                "written as the equal ai.onnx ops, which integer operators read"
            )
        return ir.passes.PassResult(model, modified=bool(moved))
