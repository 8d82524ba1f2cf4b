"""Blocked QDQ: a DequantizeLinear in front of the weight (rule 5 of the package docstring).

The weight becomes `DequantizeLinear(codes, scales[, zero_points], axis, block_size)`
(ai.onnx 21) with INT4 (symmetric) or UINT4 codes in the weight's own layout; the node that
reads it is unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qconvert.passes.int4.common import Writer, typed_codes, zero_points
from qconvert.plan.int4 import BlockedWeight


def dequantize(
    out: Writer, entry: BlockedWeight, shape: tuple[int, ...], before: ir.Node
) -> ir.Value:
    """A blocked DequantizeLinear of the weight, in its own layout; returns its output."""
    symmetric = out.scheme.symmetric
    size = out.scheme.block_size
    axis = 1 if entry.transposed else 0
    blocks = -(-shape[axis] // size)
    scale_shape = (shape[0], blocks) if entry.transposed else (blocks, shape[1])
    dtype = code_type(entry.bits, symmetric)
    base = entry.weight

    def layout(array: np.ndarray) -> np.ndarray:
        return array if entry.transposed else array.T

    codes = out.lazy(
        f"{base}_q{entry.bits}",
        entry,
        dtype,
        shape,
        lambda q: typed_codes(q, dtype, layout),
    )
    scales = out.lazy(
        f"{base}_scales",
        entry,
        ir.DataType.FLOAT,
        scale_shape,
        lambda q: layout(q.scales),
    )
    inputs = [codes, scales]
    if not symmetric:
        inputs.append(
            out.lazy(
                f"{base}_zero_points",
                entry,
                dtype,
                scale_shape,
                lambda q: zero_points(layout(q.zero_points), dtype),
            )
        )
    node = ir.Node(
        "",
        "DequantizeLinear",
        inputs,
        attributes=[ir.AttrInt64("axis", axis), ir.AttrInt64("block_size", size)],
        name=out.names.fresh(f"{base}_dequantize"),
    )
    output = node.outputs[0]
    output.name = out.names.fresh(f"{base}_dequantized")
    output.dtype = ir.DataType.FLOAT
    output.shape = ir.Shape(shape)
    out.graph.insert_before(before, node)
    return output


def code_type(bits: int, symmetric: bool) -> ir.DataType:
    """The codes' element type: INT4/UINT4 at 4 bits, INT8/UINT8 for a layer kept at 8."""
    if bits == 4:
        return ir.DataType.INT4 if symmetric else ir.DataType.UINT4
    return ir.DataType.INT8 if symmetric else ir.DataType.UINT8
