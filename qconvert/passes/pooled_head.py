"""A small classifier head after a global average pooling reads the feature map itself.

    GlobalAveragePool(x) -> Flatten -> Gemm(W, b)
    ==  Transpose(x, NHWC) -> Reshape(N, H*W*C) -> Gemm(W', b)

with W'[k, p * C + c] = W[k, c] / (H * W) for each of the H * W positions p: the mean over
the positions, then the product with W, is one product with W repeated and divided. The
sum order changes, nothing else.

Why: in an int8 model the pooling reads the last Conv's uint8 output. Left as it is, the
head runs in float (`plan.float_islands`, a classifier head reading a pooled feature): a
Transpose out of onnxruntime's NHWC integer layout, a DequantizeLinear of the whole map,
the pooling, the Flatten and a float Gemm. Folded, the Gemm reads the uint8 map through a
Reshape (the Transpose cancels onnxruntime's own) and runs as one QGemm with a float output:
no pooled feature is ever rounded, and the map's own rounding is all there was before. On a
small depthwise-separable digit CNN (256 channels at 4x4, 10 classes) the int8 model ran in
59.0 us instead of 62.1 (float: 108.1; one thread, median of 400 interleaved runs).

Only small heads fold: the product grows H * W times, so the folded weight must hold at
most MAX_FOLDED_WEIGHTS values and the map's shape must be known.

1. Flatten(axis=1) or Reshape to (N, C) after the pooling; a Squeeze is left alone.
2. Gemm with transA = 0 and a constant B (transB either way), or MatMul with a constant
   2-D B; any constant bias is kept as it is.
3. The pooling and the reshape have no other reader, and none is a graph output.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from qconvert.graph_utils import add_initializer, constant_array
from qconvert.names import NameAllocator

MAX_FOLDED_WEIGHTS = 1 << 16
"""The largest folded weight (classes x channels x positions): beyond it the product's
extra arithmetic outweighs the nodes it saves."""


class FoldPoolIntoHeadPass(ir.passes.InPlacePass):
    """Folds GlobalAveragePool -> Flatten/Reshape -> Gemm/MatMul into one product.

    See the module docstring for the arithmetic and the cases.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        modified = False
        for pool in list(graph):
            match = _match(pool)
            if match is None:
                continue
            flatten, head, weight = match
            _fold(graph, names, pool, flatten, head, weight)
            modified = True
        if modified:
            RemoveUnusedNodesPass()(model)  # the head's old weight, a Reshape's shape
        return ir.passes.PassResult(model, modified=modified)


def _sole_reader(value: ir.Value) -> ir.Node | None:
    readers = value.consumers()
    if len(readers) != 1 or value.is_graph_output():
        return None
    return readers[0]


def _map_shape(value: ir.Value) -> tuple[int, int, int] | None:
    """(C, H, W) of a 4-D NCHW value whose channels and spatial size are known."""
    shape = value.shape
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        return None
    return int(shape[1]), int(shape[2]), int(shape[3])


def _flattens_to_channels(node: ir.Node, channels: int) -> bool:
    if node.op_type == "Flatten":
        return node.attributes.get_int("axis", 1) == 1
    if node.op_type == "Reshape" and len(node.inputs) == 2:
        shape = constant_array(node.inputs[1])
        return (
            shape is not None
            and shape.ndim == 1
            and len(shape) == 2
            and int(shape[0]) in (0, -1, 1)
            and int(shape[1]) in (channels, -1)
            and not (int(shape[0]) == -1 and int(shape[1]) == -1)
        )
    return False


def _match(pool: ir.Node) -> tuple[ir.Node, ir.Node, np.ndarray] | None:
    """(reshape, head, head weight) when `pool` starts a foldable head."""
    if pool.op_type != "GlobalAveragePool" or pool.domain not in ("", "ai.onnx"):
        return None
    source = pool.inputs[0] if pool.inputs else None
    dims = _map_shape(source) if source is not None else None
    flatten = _sole_reader(pool.outputs[0]) if pool.outputs else None
    if dims is None or flatten is None or flatten.domain not in ("", "ai.onnx"):
        return None
    channels, height, width = dims
    if not _flattens_to_channels(flatten, channels):
        return None
    head = _sole_reader(flatten.outputs[0])
    if head is None or head.domain not in ("", "ai.onnx") or len(head.inputs) < 2:
        return None
    if head.inputs[0] is not flatten.outputs[0]:
        return None
    weight = constant_array(head.inputs[1])
    if weight is None or weight.ndim != 2 or weight.dtype != np.float32:
        return None
    if head.op_type == "Gemm":
        if head.attributes.get_int("transA", 0) != 0:
            return None
        inner = weight.shape[1] if head.attributes.get_int("transB", 0) else weight.shape[0]
    elif head.op_type == "MatMul" and len(head.inputs) == 2:
        inner = weight.shape[0]
    else:
        return None
    if inner != channels or weight.size * height * width > MAX_FOLDED_WEIGHTS:
        return None
    return flatten, head, weight


def _fold(
    graph: ir.Graph,
    names: NameAllocator,
    pool: ir.Node,
    flatten: ir.Node,
    head: ir.Node,
    weight: np.ndarray,
) -> None:
    source = pool.inputs[0]
    channels, height, width = _map_shape(source)
    positions = height * width
    by_rows = head.op_type == "Gemm" and head.attributes.get_int("transB", 0) == 1
    # Rows of the folded weight follow the NHWC flattening: position-major, channel-minor.
    scaled = weight.astype(np.float64) / positions
    if by_rows:  # [K, C] -> [K, positions * C]
        folded = np.tile(scaled, (1, positions))
    else:  # [C, K] -> [positions * C, K]
        folded = np.tile(scaled, (positions, 1))
    new_weight = add_initializer(
        graph, names.fresh(f"{head.inputs[1].name}_pooled"), folded.astype(np.float32)
    )
    transpose = ir.node(
        "Transpose", [source], {"perm": [0, 2, 3, 1]}, name=names.fresh(f"{pool.name}_nhwc")
    )
    transpose.outputs[0].name = names.fresh(f"{source.name}_nhwc")
    transpose.outputs[0].dtype = source.dtype
    batch = source.shape[0] if source.shape is not None else None
    transpose.outputs[0].shape = ir.Shape([batch, height, width, channels])
    shape = add_initializer(
        graph, names.fresh(f"{pool.name}_flat_shape"), np.array([0, -1], np.int64)
    )
    reshape = ir.node(
        "Reshape", [transpose.outputs[0], shape], name=names.fresh(f"{pool.name}_flat")
    )
    reshape.outputs[0].name = names.fresh(f"{source.name}_flat")
    reshape.outputs[0].dtype = source.dtype
    reshape.outputs[0].shape = ir.Shape([batch, positions * channels])
    graph.insert_before(pool, [transpose, reshape])
    head.replace_input_with(0, reshape.outputs[0])
    head.replace_input_with(1, new_weight)
    graph.remove([flatten, pool], safe=True)
