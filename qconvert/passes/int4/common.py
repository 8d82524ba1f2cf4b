"""What every blocked-weight writer shares.

The graph being written and its lazy initializers (`Writer`), node replacement, a Gemm's
bias, and 4-bit packing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from qconvert.blockwise import BlockQuantized
from qconvert.graph_utils import add_initializer, constant_array, replace_keeping_name
from qconvert.names import NameAllocator
from qconvert.nibbles import pack_nibbles
from qconvert.plan.int4 import BlockedWeight
from qconvert.schemes import BlockedWeightScheme
from qconvert.streaming import Lookahead

MICROSOFT_DOMAIN = "com.microsoft"

FOUR_BIT = (ir.DataType.INT4, ir.DataType.UINT4)

Quantizer = Callable[[BlockedWeight], BlockQuantized]


@dataclasses.dataclass(frozen=True)
class Writer:
    """The graph a pass rewrites, and what every writer needs to add to it.

    Attributes:
        graph: the model's main graph.
        names: hands out names no value or node has yet.
        scheme: the plan's bits, block size and symmetry.
        source: each weight's `BlockQuantized`; the next one is computed while the save
            writes this one (`streaming.Lookahead`).
    """

    graph: ir.Graph
    names: NameAllocator
    scheme: BlockedWeightScheme
    source: Lookahead

    def lazy(
        self,
        hint: str,
        entry: BlockedWeight,
        dtype: ir.DataType,
        shape: tuple[int, ...],
        make: Callable[[BlockQuantized], np.ndarray],
    ) -> ir.Value:
        """A new initializer whose values `make` computes from `entry`'s quantization.

        Computed when the model is serialized, not now: a weight's quantized form is held
        only while it is written.
        """
        name = self.names.fresh(hint)
        source = self.source
        source.expect(entry)  # tensors are serialized in the order they are registered

        def compute() -> ir.TensorProtocol:
            if dtype in FOUR_BIT:  # `make` gives the bytes packed already
                return ir.PackedTensor(make(source(entry)), dtype, shape=shape, name=name)
            return ir.Tensor(make(source(entry)), dtype=dtype, name=name)

        tensor = ir.LazyTensor(compute, dtype=dtype, shape=ir.Shape(shape), name=name)
        value = ir.Value(
            name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=tensor
        )
        self.graph.register_initializer(value)
        return value

    def constant(self, hint: str, array: np.ndarray) -> ir.Value:
        """A new initializer holding `array` now (shapes, bounds, biases)."""
        return add_initializer(self.graph, self.names.fresh(hint), array)


def weight_dims(entry: BlockedWeight, shape: tuple[int, ...]) -> tuple[int, int]:
    """(N, K) of a MatMul/Gemm weight stored as `shape`: (N, K) if transposed, else (K, N)."""
    n, k = shape if entry.transposed else shape[::-1]
    return n, k


def replace(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    """Puts `new` before `old`, its one output standing for `old`'s."""
    graph.insert_before(old, new)
    new.outputs[0].dtype = old.outputs[0].dtype
    new.outputs[0].shape = old.outputs[0].shape
    replace_keeping_name(graph, old, new.outputs[0])


def gemm_bias(
    out: Writer, node: ir.Node, entry: BlockedWeight
) -> tuple[ir.Value | None, ir.Value | None]:
    """A Gemm's C times beta as a new (N,) initializer: (old C, new bias), or Nones."""
    old_bias = node.inputs[2] if entry.op_type == "Gemm" and len(node.inputs) > 2 else None
    if old_bias is None:
        return None, None
    beta = node.attributes.get_float("beta", 1.0)
    bias = (constant_array(old_bias).reshape(-1) * beta).astype(np.float32)
    return old_bias, out.constant(f"{entry.node}_bias", bias)


def drop_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    """Removes the initializer `value` once no node reads it."""
    if value is not None and not value.uses() and value.name in graph.initializers:
        graph.initializers.pop(value.name)


def pack4(codes: np.ndarray, dtype: ir.DataType) -> np.ndarray:
    """4-bit codes (unsigned, 0..15) as the packed bytes of an INT4 or UINT4 tensor.

    The INT4 value of a code c is c - 8, whose two's-complement nibble is c ^ 8. ONNX packs
    two values a byte in flattened order, the first in the low nibble.
    """
    flat = np.ascontiguousarray(codes).reshape(-1)
    return pack_nibbles(flat, flip=dtype == ir.DataType.INT4)


def zero_points(values: np.ndarray, dtype: ir.DataType) -> np.ndarray:
    """Zero points as a tensor of `dtype`'s bytes: packed for UINT4."""
    if dtype == ir.DataType.UINT4:
        return pack4(values, dtype)
    return np.asarray(values).astype(np.int8 if dtype == ir.DataType.INT8 else np.uint8)


def typed_codes(
    quantized: BlockQuantized,
    dtype: ir.DataType,
    layout: Callable[[np.ndarray], np.ndarray] = lambda array: array,
) -> np.ndarray:
    """The codes as a tensor of `dtype`, in `layout` of (N, K).

    Packed for 4 bits, signed (code - 128) for INT8, else the unsigned codes.
    """
    if dtype == ir.DataType.INT8:
        return layout(quantized.signed_codes())
    codes = layout(quantized.codes[:, : quantized.k])
    return pack4(codes, dtype) if dtype in FOUR_BIT else codes
