"""Gather tables as com.microsoft GatherBlockQuantized (rule 2 of the package docstring).

`GatherBlockQuantized(data, indices, scales[, zero_points])`: data INT4 (symmetric) or
UINT4 (V, D), blocks along D (quantize_axis 1). A table kept at 8 bits is UINT8 codes with a
`bits` attribute and explicit zero points.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qconvert.blockwise import BlockQuantized
from qconvert.passes.int4.common import (
    MICROSOFT_DOMAIN,
    Writer,
    replace,
    typed_codes,
    weight_dims,
    zero_points,
)
from qconvert.plan.int4 import BlockedWeight


def initializers(
    out: Writer, entry: BlockedWeight, shape: tuple[int, ...]
) -> list[ir.Value | None]:
    """Codes (V, D), scales (V, k_blocks) and, where needed, zero points of a table."""
    symmetric = out.scheme.symmetric
    rows, k = weight_dims(entry, shape)
    blocks = -(-k // out.scheme.block_size)
    base = entry.weight
    dtype, scale_shape = code_type(entry.bits, symmetric), (rows, blocks)
    codes = out.lazy(
        f"{base}_q{entry.bits}",
        entry,
        dtype,
        (rows, k),
        lambda q: gather_codes(q, dtype),
    )
    scales = out.lazy(
        f"{base}_scales",
        entry,
        ir.DataType.FLOAT,
        scale_shape,
        lambda q: q.scales,
    )
    points = None
    if not symmetric or entry.bits == 8:
        points = out.lazy(
            f"{base}_zero_points",
            entry,
            dtype,
            scale_shape,
            lambda q: zero_points(q.zero_points, dtype),
        )
    return [codes, scales, points]


def rewrite(
    out: Writer,
    node: ir.Node,
    entry: BlockedWeight,
    values: list[ir.Value | None],
) -> None:
    """`GatherBlockQuantized(codes, indices, scales[, zero_points])` in place of the node."""
    codes, scales, points = values
    inputs = [codes, node.inputs[1], scales]
    if points is not None:
        inputs.append(points)
    attributes = [
        ir.AttrInt64("gather_axis", 0),
        ir.AttrInt64("quantize_axis", 1),
        ir.AttrInt64("block_size", out.scheme.block_size),
    ]
    if codes.dtype == ir.DataType.UINT8:
        attributes.append(ir.AttrInt64("bits", entry.bits))
    new = ir.Node(
        MICROSOFT_DOMAIN,
        "GatherBlockQuantized",
        inputs,
        attributes=attributes,
        name=out.names.fresh(f"{entry.node}_blocked"),
    )
    replace(out.graph, node, new)


def code_type(bits: int, symmetric: bool) -> ir.DataType:
    """The data's element type: INT4 or UINT4, or UINT8 for a table kept at 8 bits."""
    if bits == 8:
        return ir.DataType.UINT8  # packed form with a bits attribute and explicit zero points
    return ir.DataType.INT4 if symmetric else ir.DataType.UINT4


def gather_codes(quantized: BlockQuantized, dtype: ir.DataType) -> np.ndarray:
    """The table's codes (V, D) as a tensor of `dtype`."""
    if dtype == ir.DataType.UINT8:
        return quantized.codes[:, : quantized.k]
    whole = quantized.k == quantized.k_blocks * quantized.block_size
    if quantized.packed is not None and whole:
        # rows packed along K with no padded tail are the tensor's flattened packing
        flat = quantized.packed.reshape(-1)
        return flat ^ np.uint8(0x88) if dtype == ir.DataType.INT4 else flat
    return typed_codes(quantized, dtype)
