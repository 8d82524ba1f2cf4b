"""MatMul / Gemm as com.microsoft MatMulNBits (rule 1 of the package docstring).

`MatMulNBits(A, B, scales[, zero_points][, , bias])` with attributes K, N, bits,
block_size and accuracy_level. B is (N, k_blocks, block_size * bits / 8), codes packed low
nibble first (`blockwise.matmul_nbits_inputs`); scales one float per block, row by row. A
Gemm's C times beta becomes the bias.
"""

from __future__ import annotations

import onnx_ir as ir

from qconvert.blockwise import matmul_nbits_inputs
from qconvert.passes.int4.common import (
    MICROSOFT_DOMAIN,
    Writer,
    drop_unused,
    gemm_bias,
    replace,
    weight_dims,
)
from qconvert.plan.int4 import BlockedWeight


def initializers(
    out: Writer, entry: BlockedWeight, shape: tuple[int, ...]
) -> list[ir.Value | None]:
    """Packed codes, scales and (asymmetric) zero points in MatMulNBits' layout."""
    rows, k = weight_dims(entry, shape)
    blocks = -(-k // out.scheme.block_size)
    base = entry.weight
    blob = out.scheme.block_size * entry.bits // 8
    per_column = -(-blocks * entry.bits // 8)
    codes = out.lazy(
        f"{base}_q{entry.bits}",
        entry,
        ir.DataType.UINT8,
        (rows, blocks, blob),
        lambda q: matmul_nbits_inputs(q)[0],
    )
    scales = flat_scales(out, base, entry, rows * blocks)
    zero_points = None
    if not out.scheme.symmetric:
        zero_points = out.lazy(
            f"{base}_zero_points",
            entry,
            ir.DataType.UINT8,
            (rows * per_column,),
            lambda q: matmul_nbits_inputs(q)[2],
        )
    return [codes, scales, zero_points]


def flat_scales(out: Writer, base: str, entry: BlockedWeight, count: int) -> ir.Value:
    """MatMulNBits' scales: one float per block, flattened row by row."""
    return out.lazy(
        f"{base}_scales",
        entry,
        ir.DataType.FLOAT,
        (count,),
        lambda q: q.scales.reshape(-1),
    )


def rewrite(
    out: Writer,
    node: ir.Node,
    entry: BlockedWeight,
    values: list[ir.Value | None],
    shape: tuple[int, ...],
    accuracy_level: int,
) -> None:
    """`MatMulNBits(A, codes, scales[, zero_points][, , bias])` in place of the node."""
    n, k = weight_dims(entry, shape)
    inputs: list[ir.Value | None] = [node.inputs[0], *values]
    old_bias, bias = gemm_bias(out, node, entry)
    if bias is not None:
        inputs += [None, bias]  # g_idx is absent
    while inputs and inputs[-1] is None:
        inputs.pop()
    attributes = [
        ir.AttrInt64("K", k),
        ir.AttrInt64("N", n),
        ir.AttrInt64("bits", entry.bits),
        ir.AttrInt64("block_size", out.scheme.block_size),
    ]
    if accuracy_level:
        attributes.append(ir.AttrInt64("accuracy_level", accuracy_level))
    new = ir.Node(
        MICROSOFT_DOMAIN,
        "MatMulNBits",
        inputs,
        attributes=attributes,
        name=out.names.fresh(f"{entry.node}_nbits"),
    )
    replace(out.graph, node, new)
    drop_unused(out.graph, old_bias)
