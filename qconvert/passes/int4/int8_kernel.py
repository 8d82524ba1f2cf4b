"""MatMul / Gemm on onnxruntime's int8 GEMM (rule 4 of the package docstring).

A 4-bit weight is stored as INT4 codes (k_blocks, block_size, N), int8 block multipliers m
(k_blocks, 1, N) and one float unit per column (`blockwise`'s int8 grid), and rebuilt as
`Cast(Reshape(Cast(codes, int32) * Cast(m, int32)), int8)`: constants only, which
onnxruntime folds into one int8 weight when it loads the model. The node becomes
`DynamicQuantizeMatMul(A, W8, units[, , bias])`: int8 GEMM, activations quantized per tensor
on the fly. The file holds 4.25 bits a weight; memory at run time, 8. A layer kept at 8 bits
is one int8 initializer (K, N) with a scale per column (`blockwise.quantize_columns_int8`),
read by the same DynamicQuantizeMatMul.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qconvert.blockwise import BlockQuantized
from qconvert.passes.int4.common import (
    MICROSOFT_DOMAIN,
    Writer,
    drop_unused,
    gemm_bias,
    pack4,
    replace,
    weight_dims,
)
from qconvert.plan.int4 import BlockedWeight


def fits(out: Writer, entry: BlockedWeight) -> bool:
    """Whether the int8 kernel can run `entry`: a symmetric MatMul/Gemm, not tied."""
    return out.scheme.symmetric and entry.op_type != "Gather" and entry.tied_to is None


def weight(
    out: Writer, entry: BlockedWeight, shape: tuple[int, ...], before: ir.Node
) -> ir.Value:
    """The int8 weight (K, N): rebuilt from 4-bit codes at load, or stored at 8 bits."""
    if entry.bits == 4:
        return _rebuilt_weight(out, entry, shape, before)
    return _plain_weight(out, entry, shape)


def _rebuilt_weight(
    out: Writer, entry: BlockedWeight, shape: tuple[int, ...], before: ir.Node
) -> ir.Value:
    """The int8 weight (K, N) rebuilt from INT4 codes and block multipliers."""
    n, k = weight_dims(entry, shape)
    size = out.scheme.block_size
    blocks = -(-k // size)
    base = entry.weight
    codes = out.lazy(
        f"{base}_q4",
        entry,
        ir.DataType.INT4,
        (blocks, size, n),
        lambda q: pack4(_padded_codes(q), ir.DataType.INT4),
    )
    multipliers = out.lazy(
        f"{base}_multipliers",
        entry,
        ir.DataType.INT8,
        (blocks, 1, n),
        lambda q: np.ascontiguousarray(q.multipliers().T[:, None, :]),
    )
    target = out.constant(f"{base}_int8_shape", np.array([blocks * size, n], dtype=np.int64))
    steps = [
        ("Cast", [codes], [ir.AttrInt64("to", ir.DataType.INT32)]),
        ("Cast", [multipliers], [ir.AttrInt64("to", ir.DataType.INT32)]),
    ]
    made = [_constant_op(out, base, *step, before) for step in steps]
    value = _constant_op(out, base, "Mul", made, [], before)
    value = _constant_op(out, base, "Reshape", [value, target], [], before)
    if blocks * size != k:  # the padded tail of the last block goes
        bounds = [
            np.array([0], np.int64),
            np.array([k], np.int64),
            np.array([0], np.int64),
        ]
        consts = [out.constant(f"{base}_slice", array) for array in bounds]
        value = _constant_op(out, base, "Slice", [value, *consts], [], before)
    cast = [ir.AttrInt64("to", ir.DataType.INT8)]
    return _constant_op(out, base, "Cast", [value], cast, before)


def _plain_weight(out: Writer, entry: BlockedWeight, shape: tuple[int, ...]) -> ir.Value:
    """A layer kept at 8 bits: its int8 weight (K, N) as it is, nothing to rebuild at load."""
    n, k = weight_dims(entry, shape)
    return out.lazy(
        f"{entry.weight}_int8",
        entry,
        ir.DataType.INT8,
        (k, n),
        lambda q: np.ascontiguousarray(q.int8_weight().T),
    )


def _constant_op(
    out: Writer,
    base: str,
    op_type: str,
    inputs: list[ir.Value],
    attributes: list,
    before: ir.Node,
) -> ir.Value:
    """One node of the constant chain, put before `before`; returns its output."""
    node = ir.Node("", op_type, inputs, attributes=attributes, name=out.names.fresh(base))
    node.outputs[0].name = out.names.fresh(f"{base}_{op_type.lower()}")
    out.graph.insert_before(before, node)
    return node.outputs[0]


def rewrite(
    out: Writer,
    node: ir.Node,
    entry: BlockedWeight,
    w8: ir.Value,
    shape: tuple[int, ...],
) -> None:
    """`DynamicQuantizeMatMul(A, w8, units[, , bias])` in place of the node."""
    n, _ = weight_dims(entry, shape)
    units = out.lazy(
        f"{entry.weight}_units",
        entry,
        ir.DataType.FLOAT,
        (n,),
        lambda q: q.units,
    )
    old_bias, bias = gemm_bias(out, node, entry)
    inputs: list[ir.Value | None] = [node.inputs[0], w8, units]
    if bias is not None:
        inputs += [None, bias]  # no weight zero point: symmetric
    new = ir.Node(
        MICROSOFT_DOMAIN,
        "DynamicQuantizeMatMul",
        inputs,
        name=out.names.fresh(f"{entry.node}_int8"),
    )
    replace(out.graph, node, new)
    drop_unused(out.graph, old_bias)


def _padded_codes(quantized: BlockQuantized) -> np.ndarray:
    """(k_blocks, block_size, N) unsigned codes, the padded tail (zero points) included."""
    blocks = quantized.codes.reshape(quantized.n, quantized.k_blocks, quantized.block_size)
    return np.ascontiguousarray(blocks.transpose(1, 2, 0))
