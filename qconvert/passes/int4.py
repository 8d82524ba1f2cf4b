"""Writing blocked weights: com.microsoft MatMulNBits / GatherBlockQuantized, or blocked QDQ.

The pass applies an `Int4Plan`; the quantized values come from `quantize`, a function of
one `BlockedWeight` giving its `BlockQuantized` in (N, K) layout (round-to-nearest or GPTQ,
the pipeline's choice). Every new initializer is an `ir.LazyTensor`: the values are computed
when the model is serialized, tensor by tensor, so a model with external data is quantized
and written holding about two weights in memory at a time: the one being written and the next
one, quantized meanwhile on a second core (`streaming.Lookahead`).

1. qop, MatMul / Gemm: `MatMulNBits(A, B, scales[, zero_points][, , bias])` with attributes
   K, N, bits, block_size, accuracy_level. B is (N, k_blocks, block_size * bits / 8), codes
   packed low nibble first (`blockwise.matmul_nbits_inputs`). A Gemm's C times beta becomes
   the bias.
2. qop, Gather: `GatherBlockQuantized(data, indices, scales[, zero_points])`, data INT4
   (symmetric) or UINT4 (V, D), blocks along D (quantize_axis 1).
3. qop, tied embeddings (`BlockedWeight.tied_to`): the table is written once as packed
   uint8 (V, k_blocks, block_size / 2), MatMulNBits' B layout. The Gather becomes
   `GatherBlockQuantized(data, indices, scales (V, k_blocks, 1))` with bits 4 and
   quantize_axis 2 (blocks along the data's last axis), whose (..., k_blocks, block_size)
   output a Reshape flattens back to (..., D); the tied MatMul/Gemm becomes MatMulNBits
   on the same data with its own (V * k_blocks) scales.
4. qop with the int8 kernel, MatMul / Gemm of 4 bits: the weight is stored as INT4 codes
   (k_blocks, block_size, N), int8 block multipliers m (k_blocks, 1, N) and one float unit
   per column (`blockwise`'s int8 grid), and rebuilt as
   `Cast(Reshape(Cast(codes, int32) * Cast(m, int32)), int8)`: constants only, which
   onnxruntime folds into one int8 weight when it loads the model. The node becomes
   `DynamicQuantizeMatMul(A, W8, units[, , bias])`: int8 GEMM, activations quantized per
   tensor on the fly. The file holds 4.25 bits a weight; memory at run time, 8. A layer
   kept at 8 bits is one int8 initializer (K, N) with a scale per column
   (`blockwise.quantize_columns_int8`), read by the same DynamicQuantizeMatMul.
5. qdq: the weight becomes `DequantizeLinear(codes, scales[, zero_points], axis, block_size)`
   (ai.onnx 21) with INT4 (symmetric) or UINT4 codes in the weight's own layout; the node
   itself is unchanged.

With `input_scales` (node -> s, `awq`), the node's input is first multiplied by 1/s (a Mul
before it); its quantized weight then stands for diag(s) W.

Nodes keep their output names; float weights no node reads any more are removed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir

from qconvert.blockwise import BlockQuantized, matmul_nbits_inputs, pack_nibbles
from qconvert.graph_utils import add_initializer, constant_array, replace_keeping_name
from qconvert.names import NameAllocator
from qconvert.plan.int4 import BlockedWeight, Int4Plan
from qconvert.streaming import Lookahead

MICROSOFT_DOMAIN = "com.microsoft"

Quantizer = Callable[[BlockedWeight], BlockQuantized]


def _weight_key(entry: BlockedWeight) -> tuple:
    """Entries of one weight, bit width and layout share one quantization."""
    return (entry.weight, entry.bits, entry.transposed)


class WriteBlockedWeightsPass(ir.passes.InPlacePass):
    """Rewrites the planned MatMul/Gemm/Gather weights into blocked form (module docstring)."""

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
        names = NameAllocator(graph)
        nodes = {node.name: node for node in graph}
        written: dict[tuple, list[ir.Value | None]] = {}
        tables = {e.weight: e for e in self.plan.weights if e.op_type == "Gather"}
        tied = {e.tied_to for e in self.plan.weights if e.tied_to is not None}
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
                self._divide_input(graph, names, node, self.input_scales[entry.node])
            key = (entry.weight, entry.bits, entry.transposed, entry.op_type == "Gather")
            table = entry.tied_to
            if entry.op_type == "Gather" and entry.weight in tied:
                table = entry.weight
            if table is not None and self.format != "qdq":
                source = tables[table]
                if table not in shared:
                    shared[table] = self._shared_codes(graph, names, source, shapes[table])
                self._tied(graph, names, node, entry, source, shared[table], shapes[table])
            elif self.format == "qdq":
                if key not in written:
                    written[key] = [self._dequantize(graph, names, entry, shape, node)]
                index = 0 if entry.op_type == "Gather" else 1
                node.replace_input_with(index, written[key][0])
            elif self._int8_kernel(entry):
                key = (*key, "int8")
                if key not in written:
                    make = self._int8_weight if entry.bits == 4 else self._plain_int8_weight
                    written[key] = [make(graph, names, entry, shape, node)]
                self._int8_matmul(graph, names, node, entry, written[key][0], shape)
            else:
                if key not in written:
                    written[key] = self._initializers(graph, names, entry, shape)
                if entry.op_type == "Gather":
                    self._gather(graph, names, node, entry, written[key], shape)
                else:
                    self._matmul(graph, names, node, entry, written[key], shape)
            weight = graph.initializers.get(entry.weight)
            if weight is not None and not weight.uses() and not weight.is_graph_output():
                graph.initializers.pop(entry.weight)
        if self.plan.weights and self.format != "qdq":
            model.opset_imports.setdefault(MICROSOFT_DOMAIN, 1)
        return ir.passes.PassResult(model, modified=bool(self.plan.weights))

    def _lazy(
        self,
        graph: ir.Graph,
        name: str,
        entry: BlockedWeight,
        dtype: ir.DataType,
        shape: tuple[int, ...],
        make: Callable[[BlockQuantized], np.ndarray],
    ) -> ir.Value:
        source = self._source
        source.expect(entry)  # tensors are serialized in the order they are registered

        def compute() -> ir.TensorProtocol:
            if dtype in _FOUR_BIT:  # `make` gives the bytes packed already
                return ir.PackedTensor(make(source(entry)), dtype, shape=shape, name=name)
            return ir.Tensor(make(source(entry)), dtype=dtype, name=name)

        tensor = ir.LazyTensor(compute, dtype=dtype, shape=ir.Shape(shape), name=name)
        value = ir.Value(
            name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=tensor
        )
        graph.register_initializer(value)
        return value

    def _initializers(
        self,
        graph: ir.Graph,
        names: NameAllocator,
        entry: BlockedWeight,
        shape: tuple[int, ...],
    ) -> list[ir.Value | None]:
        """Codes, scales and (asymmetric) zero points in the runtime's layout."""
        symmetric = self.plan.scheme.symmetric
        rows, k = shape if entry.transposed else shape[::-1]
        blocks = -(-k // self.plan.scheme.block_size)
        base = entry.weight
        if entry.op_type == "Gather":
            code_type, scale_shape = _gather_code_type(entry.bits, symmetric), (rows, blocks)
            codes = self._lazy(
                graph,
                names.fresh(f"{base}_q{entry.bits}"),
                entry,
                code_type,
                (rows, k),
                lambda q: _gather_codes(q, code_type),
            )
            scales = self._lazy(
                graph,
                names.fresh(f"{base}_scales"),
                entry,
                ir.DataType.FLOAT,
                scale_shape,
                lambda q: q.scales,
            )
            zero_points = None
            if not symmetric or entry.bits == 8:
                zero_points = self._lazy(
                    graph,
                    names.fresh(f"{base}_zero_points"),
                    entry,
                    code_type,
                    scale_shape,
                    lambda q: _gather_zero_points(q, code_type),
                )
            return [codes, scales, zero_points]
        blob = self.plan.scheme.block_size * entry.bits // 8
        per_column = -(-blocks * entry.bits // 8)
        codes = self._lazy(
            graph,
            names.fresh(f"{base}_q{entry.bits}"),
            entry,
            ir.DataType.UINT8,
            (rows, blocks, blob),
            lambda q: matmul_nbits_inputs(q)[0],
        )
        scales = self._flat_scales(graph, names, base, entry, rows * blocks)
        zero_points = None
        if not symmetric:
            zero_points = self._lazy(
                graph,
                names.fresh(f"{base}_zero_points"),
                entry,
                ir.DataType.UINT8,
                (rows * per_column,),
                lambda q: matmul_nbits_inputs(q)[2],
            )
        return [codes, scales, zero_points]

    def _flat_scales(
        self,
        graph: ir.Graph,
        names: NameAllocator,
        base: str,
        entry: BlockedWeight,
        count: int,
    ) -> ir.Value:
        """MatMulNBits' scales: one float per block, flattened row by row."""
        return self._lazy(
            graph,
            names.fresh(f"{base}_scales"),
            entry,
            ir.DataType.FLOAT,
            (count,),
            lambda q: q.scales.reshape(-1),
        )

    def _shared_codes(
        self,
        graph: ir.Graph,
        names: NameAllocator,
        table: BlockedWeight,
        shape: tuple[int, ...],
    ) -> ir.Value:
        """A tied table's packed codes, (V, k_blocks, block_size / 2) uint8."""
        rows, width = shape
        blocks = width // self.plan.scheme.block_size
        return self._lazy(
            graph,
            names.fresh(f"{table.weight}_q4"),
            table,
            ir.DataType.UINT8,
            (rows, blocks, self.plan.scheme.block_size // 2),
            lambda q: matmul_nbits_inputs(q)[0],
        )

    def _tied(
        self,
        graph: ir.Graph,
        names: NameAllocator,
        node: ir.Node,
        entry: BlockedWeight,
        table: BlockedWeight,
        codes: ir.Value,
        shape: tuple[int, ...],
    ) -> None:
        """Rewrites the Gather of a tied table, or its output projection, onto `codes`."""
        rows, width = shape
        blocks = width // self.plan.scheme.block_size
        if entry.op_type != "Gather":
            scales = self._flat_scales(graph, names, table.weight, table, rows * blocks)
            own = (rows, width) if entry.transposed else (width, rows)
            self._matmul(graph, names, node, entry, [codes, scales, None], own)
            return
        scales = self._lazy(
            graph,
            names.fresh(f"{table.weight}_gather_scales"),
            table,
            ir.DataType.FLOAT,
            (rows, blocks, 1),
            lambda q: q.scales[:, :, None],
        )
        gathered = ir.Node(
            MICROSOFT_DOMAIN,
            "GatherBlockQuantized",
            [codes, node.inputs[1], scales],
            attributes=[
                ir.AttrInt64("gather_axis", 0),
                ir.AttrInt64("quantize_axis", 2),
                ir.AttrInt64("block_size", self.plan.scheme.block_size),
                ir.AttrInt64("bits", 4),
            ],
            name=names.fresh(f"{entry.node}_blocked"),
        )
        gathered.outputs[0].name = names.fresh(f"{entry.node}_blocks")
        gathered.outputs[0].dtype = ir.DataType.FLOAT
        rank = len(node.inputs[1].shape)
        target = names.fresh(f"{entry.node}_shape")
        add_initializer(graph, target, np.array([0] * rank + [-1], dtype=np.int64))
        flatten = ir.Node(
            "",
            "Reshape",
            [gathered.outputs[0], graph.initializers[target]],
            name=names.fresh(f"{entry.node}_flatten"),
        )
        graph.insert_before(node, gathered)
        _replace(graph, node, flatten)

    def _matmul(
        self,
        graph: ir.Graph,
        names: NameAllocator,
        node: ir.Node,
        entry: BlockedWeight,
        values: list[ir.Value | None],
        shape: tuple[int, ...],
    ) -> None:
        n, k = shape if entry.transposed else shape[::-1]
        inputs: list[ir.Value | None] = [node.inputs[0], *values]
        old_bias, bias = _gemm_bias(graph, names, node, entry)
        if bias is not None:
            inputs += [None, bias]  # g_idx is absent
        while inputs and inputs[-1] is None:
            inputs.pop()
        attributes = [
            ir.AttrInt64("K", k),
            ir.AttrInt64("N", n),
            ir.AttrInt64("bits", entry.bits),
            ir.AttrInt64("block_size", self.plan.scheme.block_size),
        ]
        if self.accuracy_level:
            attributes.append(ir.AttrInt64("accuracy_level", self.accuracy_level))
        new = ir.Node(
            MICROSOFT_DOMAIN,
            "MatMulNBits",
            inputs,
            attributes=attributes,
            name=names.fresh(f"{entry.node}_nbits"),
        )
        _replace(graph, node, new)
        _drop_unused(graph, old_bias)

    def _divide_input(
        self, graph: ir.Graph, names: NameAllocator, node: ir.Node, scales: np.ndarray
    ) -> None:
        """`Mul(x, 1/s)` before the node, which then reads it (AWQ-class scaling)."""
        inverse = (1.0 / scales).astype(np.float32)
        value = add_initializer(graph, names.fresh(f"{node.name}_input_scale"), inverse)
        mul = ir.Node(
            "", "Mul", [node.inputs[0], value], name=names.fresh(f"{node.name}_scale")
        )
        mul.outputs[0].name = names.fresh(f"{node.name}_scaled_input")
        mul.outputs[0].dtype = ir.DataType.FLOAT
        graph.insert_before(node, mul)
        node.replace_input_with(0, mul.outputs[0])

    def _int8_kernel(self, entry: BlockedWeight) -> bool:
        return (
            self.kernel == "int8"
            and self.plan.scheme.symmetric
            and entry.op_type != "Gather"
            and entry.tied_to is None
        )

    def _int8_weight(
        self,
        graph: ir.Graph,
        names: NameAllocator,
        entry: BlockedWeight,
        shape: tuple[int, ...],
        before: ir.Node,
    ) -> ir.Value:
        """The int8 weight (K, N) rebuilt from INT4 codes and block multipliers (rule 4)."""
        n, k = shape if entry.transposed else shape[::-1]
        size = self.plan.scheme.block_size
        blocks = -(-k // size)
        base = entry.weight
        codes = self._lazy(
            graph,
            names.fresh(f"{base}_q4"),
            entry,
            ir.DataType.INT4,
            (blocks, size, n),
            lambda q: _pack4(_padded_codes(q), ir.DataType.INT4),
        )
        multipliers = self._lazy(
            graph,
            names.fresh(f"{base}_multipliers"),
            entry,
            ir.DataType.INT8,
            (blocks, 1, n),
            lambda q: np.ascontiguousarray(q.multipliers().T[:, None, :]),
        )
        dims = np.array([blocks * size, n], dtype=np.int64)
        target = add_initializer(graph, names.fresh(f"{base}_int8_shape"), dims)
        steps = [
            ("Cast", [codes], [ir.AttrInt64("to", ir.DataType.INT32)]),
            ("Cast", [multipliers], [ir.AttrInt64("to", ir.DataType.INT32)]),
        ]
        made = [self._constant_op(graph, names, base, *step, before) for step in steps]
        value = self._constant_op(graph, names, base, "Mul", made, [], before)
        value = self._constant_op(graph, names, base, "Reshape", [value, target], [], before)
        if blocks * size != k:  # the padded tail of the last block goes
            bounds = [
                np.array([0], np.int64),
                np.array([k], np.int64),
                np.array([0], np.int64),
            ]
            consts = [
                add_initializer(graph, names.fresh(f"{base}_slice"), array) for array in bounds
            ]
            value = self._constant_op(
                graph, names, base, "Slice", [value, *consts], [], before
            )
        cast = [ir.AttrInt64("to", ir.DataType.INT8)]
        return self._constant_op(graph, names, base, "Cast", [value], cast, before)

    def _plain_int8_weight(
        self,
        graph: ir.Graph,
        names: NameAllocator,
        entry: BlockedWeight,
        shape: tuple[int, ...],
        before: ir.Node,
    ) -> ir.Value:
        """A layer kept at 8 bits on the int8 kernel: its int8 weight (K, N) as it is."""
        del before  # nothing to rebuild at load
        n, k = shape if entry.transposed else shape[::-1]
        return self._lazy(
            graph,
            names.fresh(f"{entry.weight}_int8"),
            entry,
            ir.DataType.INT8,
            (k, n),
            lambda q: np.ascontiguousarray(q.int8_weight().T),
        )

    def _constant_op(
        self,
        graph: ir.Graph,
        names: NameAllocator,
        base: str,
        op_type: str,
        inputs: list[ir.Value],
        attributes: list,
        before: ir.Node,
    ) -> ir.Value:
        node = ir.Node("", op_type, inputs, attributes=attributes, name=names.fresh(base))
        node.outputs[0].name = names.fresh(f"{base}_{op_type.lower()}")
        graph.insert_before(before, node)
        return node.outputs[0]

    def _int8_matmul(
        self,
        graph: ir.Graph,
        names: NameAllocator,
        node: ir.Node,
        entry: BlockedWeight,
        weight: ir.Value,
        shape: tuple[int, ...],
    ) -> None:
        """`DynamicQuantizeMatMul(A, W8, units[, , bias])` in place of the node (rule 4)."""
        n = shape[0] if entry.transposed else shape[1]
        units = self._lazy(
            graph,
            names.fresh(f"{entry.weight}_units"),
            entry,
            ir.DataType.FLOAT,
            (n,),
            lambda q: q.units,
        )
        old_bias, bias = _gemm_bias(graph, names, node, entry)
        inputs: list[ir.Value | None] = [node.inputs[0], weight, units]
        if bias is not None:
            inputs += [None, bias]  # no weight zero point: symmetric
        new = ir.Node(
            MICROSOFT_DOMAIN,
            "DynamicQuantizeMatMul",
            inputs,
            name=names.fresh(f"{entry.node}_int8"),
        )
        _replace(graph, node, new)
        _drop_unused(graph, old_bias)

    def _gather(
        self,
        graph: ir.Graph,
        names: NameAllocator,
        node: ir.Node,
        entry: BlockedWeight,
        values: list[ir.Value | None],
        shape: tuple[int, ...],
    ) -> None:
        codes, scales, zero_points = values
        inputs = [codes, node.inputs[1], scales]
        if zero_points is not None:
            inputs.append(zero_points)
        attributes = [
            ir.AttrInt64("gather_axis", 0),
            ir.AttrInt64("quantize_axis", 1),
            ir.AttrInt64("block_size", self.plan.scheme.block_size),
        ]
        if codes.dtype == ir.DataType.UINT8:
            attributes.append(ir.AttrInt64("bits", entry.bits))
        new = ir.Node(
            MICROSOFT_DOMAIN,
            "GatherBlockQuantized",
            inputs,
            attributes=attributes,
            name=names.fresh(f"{entry.node}_blocked"),
        )
        _replace(graph, node, new)

    def _dequantize(
        self,
        graph: ir.Graph,
        names: NameAllocator,
        entry: BlockedWeight,
        shape: tuple[int, ...],
        before: ir.Node,
    ) -> ir.Value:
        """A blocked DequantizeLinear of the weight, in its own layout; returns its output."""
        symmetric = self.plan.scheme.symmetric
        size = self.plan.scheme.block_size
        axis = 1 if entry.transposed else 0
        blocks = -(-shape[axis] // size)
        scale_shape = (shape[0], blocks) if entry.transposed else (blocks, shape[1])
        code_type = _qdq_code_type(entry.bits, symmetric)
        base = entry.weight

        def layout(array: np.ndarray) -> np.ndarray:
            return array if entry.transposed else array.T

        codes = self._lazy(
            graph,
            names.fresh(f"{base}_q{entry.bits}"),
            entry,
            code_type,
            shape,
            lambda q: _qdq_codes(q, code_type, layout),
        )
        scales = self._lazy(
            graph,
            names.fresh(f"{base}_scales"),
            entry,
            ir.DataType.FLOAT,
            scale_shape,
            lambda q: layout(q.scales),
        )
        inputs = [codes, scales]
        if not symmetric:
            inputs.append(
                self._lazy(
                    graph,
                    names.fresh(f"{base}_zero_points"),
                    entry,
                    code_type,
                    scale_shape,
                    lambda q: _zero_points(layout(q.zero_points), code_type),
                )
            )
        node = ir.Node(
            "",
            "DequantizeLinear",
            inputs,
            attributes=[ir.AttrInt64("axis", axis), ir.AttrInt64("block_size", size)],
            name=names.fresh(f"{base}_dequantize"),
        )
        output = node.outputs[0]
        output.name = names.fresh(f"{base}_dequantized")
        output.dtype = ir.DataType.FLOAT
        output.shape = ir.Shape(shape)
        graph.insert_before(before, node)
        return output


def _gemm_bias(
    graph: ir.Graph, names: NameAllocator, node: ir.Node, entry: BlockedWeight
) -> tuple[ir.Value | None, ir.Value | None]:
    """A Gemm's C times beta as a new (N,) initializer: (old C, new bias), or Nones."""
    old_bias = node.inputs[2] if entry.op_type == "Gemm" and len(node.inputs) > 2 else None
    if old_bias is None:
        return None, None
    beta = node.attributes.get_float("beta", 1.0)
    bias = (constant_array(old_bias).reshape(-1) * beta).astype(np.float32)
    return old_bias, add_initializer(graph, names.fresh(f"{entry.node}_bias"), bias)


def _drop_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    if value is not None and not value.uses() and value.name in graph.initializers:
        graph.initializers.pop(value.name)


def _padded_codes(quantized: BlockQuantized) -> np.ndarray:
    """(k_blocks, block_size, N) unsigned codes, the padded tail (zero points) included."""
    blocks = quantized.codes.reshape(quantized.n, quantized.k_blocks, quantized.block_size)
    return np.ascontiguousarray(blocks.transpose(1, 2, 0))


def _replace(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    """Puts `new` before `old`, its one output standing for `old`'s."""
    graph.insert_before(old, new)
    new.outputs[0].dtype = old.outputs[0].dtype
    new.outputs[0].shape = old.outputs[0].shape
    replace_keeping_name(graph, old, new.outputs[0])


def _qdq_code_type(bits: int, symmetric: bool) -> ir.DataType:
    if bits == 4:
        return ir.DataType.INT4 if symmetric else ir.DataType.UINT4
    return ir.DataType.INT8 if symmetric else ir.DataType.UINT8


def _gather_code_type(bits: int, symmetric: bool) -> ir.DataType:
    if bits == 8:
        return ir.DataType.UINT8  # packed form with a bits attribute and explicit zero points
    return ir.DataType.INT4 if symmetric else ir.DataType.UINT4


_FOUR_BIT = (ir.DataType.INT4, ir.DataType.UINT4)


def _pack4(codes: np.ndarray, dtype: ir.DataType) -> np.ndarray:
    """4-bit codes (unsigned, 0..15) as the packed bytes of an INT4 or UINT4 tensor.

    The INT4 value of a code c is c - 8, whose two's-complement nibble is c ^ 8. ONNX packs
    two values a byte in flattened order, the first in the low nibble.
    """
    flat = np.ascontiguousarray(codes).reshape(-1)
    return pack_nibbles(flat, flip=dtype == ir.DataType.INT4)


def _zero_points(values: np.ndarray, dtype: ir.DataType) -> np.ndarray:
    if dtype == ir.DataType.UINT4:
        return _pack4(values, dtype)
    return np.asarray(values).astype(np.int8 if dtype == ir.DataType.INT8 else np.uint8)


def _qdq_codes(
    quantized: BlockQuantized,
    dtype: ir.DataType,
    layout: Callable[[np.ndarray], np.ndarray] = lambda array: array,
) -> np.ndarray:
    """The codes in `layout` of (N, K).

    Packed for 4 bits, signed (code - 128) for INT8, else the unsigned codes.
    """
    if dtype == ir.DataType.INT8:
        return layout(quantized.signed_codes())
    codes = layout(quantized.codes[:, : quantized.k])
    return _pack4(codes, dtype) if dtype in _FOUR_BIT else codes


def _gather_codes(quantized: BlockQuantized, dtype: ir.DataType) -> np.ndarray:
    if dtype == ir.DataType.UINT8:
        return quantized.codes[:, : quantized.k]
    whole = quantized.k == quantized.k_blocks * quantized.block_size
    if quantized.packed is not None and whole:
        # rows packed along K with no padded tail are the tensor's flattened packing
        flat = quantized.packed.reshape(-1)
        return flat ^ np.uint8(0x88) if dtype == ir.DataType.INT4 else flat
    return _qdq_codes(quantized, dtype)


def _gather_zero_points(quantized: BlockQuantized, dtype: ir.DataType) -> np.ndarray:
    return _zero_points(quantized.zero_points, dtype)


__all__ = ["WriteBlockedWeightsPass"]
