"""Tied embeddings on one packed table (rule 3 of the package docstring).

The table is written once as packed uint8 (V, k_blocks, block_size / 2), MatMulNBits' B
layout. The Gather becomes `GatherBlockQuantized(data, indices, scales (V, k_blocks, 1))`
with bits 4 and quantize_axis 2 (blocks along the data's last axis), whose
(..., k_blocks, block_size) output a Reshape flattens back to (..., D); the tied MatMul/Gemm
becomes MatMulNBits on the same data with its own (V * k_blocks) scales.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qconvert.blockwise import matmul_nbits_inputs
from qconvert.passes.int4 import nbits
from qconvert.passes.int4.common import MICROSOFT_DOMAIN, Writer, replace
from qconvert.plan.int4 import BlockedWeight


def shared_codes(out: Writer, table: BlockedWeight, shape: tuple[int, ...]) -> ir.Value:
    """A tied table's packed codes, (V, k_blocks, block_size / 2) uint8."""
    rows, width = shape
    blocks = width // out.scheme.block_size
    return out.lazy(
        f"{table.weight}_q4",
        table,
        ir.DataType.UINT8,
        (rows, blocks, out.scheme.block_size // 2),
        lambda q: matmul_nbits_inputs(q)[0],
    )


def rewrite(
    out: Writer,
    node: ir.Node,
    entry: BlockedWeight,
    table: BlockedWeight,
    codes: ir.Value,
    shape: tuple[int, ...],
    accuracy_level: int,
) -> None:
    """Rewrites the Gather of a tied table, or its output projection, onto `codes`."""
    rows, width = shape
    blocks = width // out.scheme.block_size
    if entry.op_type != "Gather":
        scales = nbits.flat_scales(out, table.weight, table, rows * blocks)
        own = (rows, width) if entry.transposed else (width, rows)
        nbits.rewrite(out, node, entry, [codes, scales, None], own, accuracy_level)
        return
    scales = out.lazy(
        f"{table.weight}_gather_scales",
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
            ir.AttrInt64("block_size", out.scheme.block_size),
            ir.AttrInt64("bits", 4),
        ],
        name=out.names.fresh(f"{entry.node}_blocked"),
    )
    gathered.outputs[0].name = out.names.fresh(f"{entry.node}_blocks")
    gathered.outputs[0].dtype = ir.DataType.FLOAT
    rank = len(node.inputs[1].shape)
    target = out.constant(f"{entry.node}_shape", np.array([0] * rank + [-1], dtype=np.int64))
    flatten = ir.Node(
        "",
        "Reshape",
        [gathered.outputs[0], target],
        name=out.names.fresh(f"{entry.node}_flatten"),
    )
    out.graph.insert_before(node, gathered)
    replace(out.graph, node, flatten)
