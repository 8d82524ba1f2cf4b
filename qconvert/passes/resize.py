"""Nearest upsampling by whole factors, run as a copy of the integers.

A quantized nearest `Resize` is `DequantizeLinear -> Resize -> QuantizeLinear` with one
pair of parameters; onnxruntime drops the pair and runs the Resize on the uint8 values.
Next to its QLinearConvs that Resize runs in the NHWC layout, where onnxruntime's 8-bit
nearest kernel computes an index for each output value: on a text-probability-map head (six 2x,
4x and 8x upsamplings to 80x80) it took 1.13 ms of one thread, against 0.42-0.68 ms for
the float model's NCHW Resizes.

Nearest upsampling of an NCHW tensor by whole factors (sh, sw) repeats each value in an
sh x sw block, which is a broadcast:

    x [N, C, H, W]  --Transpose(0, 2, 3, 1)-->  [N, H, W, C]
      --Unsqueeze(axes 2, 4)-->  [N, H, 1, W, 1, C]
      --Expand([1, 1, sh, 1, sw, 1])-->  [N, H, sh, W, sw, C]
      --Reshape(Shape(NHWC) * [1, sh, sw, 1])-->  [N, H*sh, W*sw, C]
      --Transpose(0, 3, 1, 2)-->  [N, C, H*sh, W*sw]

`ResizeOnIntegersPass` (after the QDQ rewrite) writes that chain on the integers the
DequantizeLinear read, where the QuantizeLinear after the Resize has the same parameters
(so the integers it wrote are the input's integers, repeated). The output is the same
number for number; the Reshape's target comes from the Shape, so H and W may be dynamic.
The chain is written in NHWC because there Expand copies runs of C values; in NCHW it
would copy one value at a time (measured 1.4x slower over that whole detector). onnxruntime's
layout pass cancels the two Transposes against the ones it puts around its NHWC integer
kernels; next to NCHW kernels they stay, on the small input and the upsampled output.

Which Resizes are whole-factor repeats (`integer_factors`): mode `nearest`, rank 4,
constant scales [1, 1, sh, sw] with whole sh, sw >= 1 (not both 1), no `axes`, and a
coordinate mapping that sends output index i to input index i // s:

1. `asymmetric` with nearest_mode `floor`: floor(i / s) = i // s.
2. `half_pixel` or `pytorch_half_pixel` with `round_prefer_floor` or `round_prefer_ceil`:
   with i = q s + r, (i + 0.5) / s - 0.5 = q + ((r + 0.5) / s - 0.5), and the bracket lies
   strictly inside (-0.5, 0.5), so it rounds to q and no tie arises. (pytorch_half_pixel
   differs only for an output of length 1, which s >= 2 never writes; s = 1 maps i to i.)

Other mappings (align_corners, `asymmetric` with rounding, `floor` with half_pixel,
tf_crop_and_resize) pick other input indices, and are left as they are.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from qconvert.graph_utils import add_initializer, constant_array
from qconvert.names import NameAllocator
from qconvert.passes.pad import qdq_around, take_place_of

_EXACT_MAPPINGS = frozenset(
    {
        ("asymmetric", "floor"),
        ("half_pixel", "round_prefer_floor"),
        ("half_pixel", "round_prefer_ceil"),
        ("pytorch_half_pixel", "round_prefer_floor"),
        ("pytorch_half_pixel", "round_prefer_ceil"),
    }
)
"""(coordinate_transformation_mode, nearest_mode) pairs that map output i to i // s."""

_UNSQUEEZE_AXES_AS_INPUT = 13
"""Unsqueeze takes its axes as an input from opset 13, an attribute before."""


def integer_factors(resize: ir.Node, opset: int) -> tuple[int, int] | None:
    """(sh, sw) when `resize` repeats each value of an NCHW tensor in sh x sw blocks.

    None for any other Resize (see the module docstring for the cases).
    """
    if resize.op_type != "Resize" or resize.domain not in ("", "ai.onnx") or opset < 11:
        return None
    attributes = resize.attributes
    if attributes.get_string("mode", "nearest") != "nearest" or "axes" in attributes:
        return None
    mapping = (
        attributes.get_string("coordinate_transformation_mode", "half_pixel"),
        attributes.get_string("nearest_mode", "round_prefer_floor"),
    )
    if mapping not in _EXACT_MAPPINGS:
        return None
    if len(resize.inputs) < 3 or (len(resize.inputs) > 3 and resize.inputs[3] is not None):
        return None  # sizes, not scales
    scales = constant_array(resize.inputs[2])
    if scales is None or scales.shape != (4,):
        return None
    if resize.inputs[0] is None or (
        resize.inputs[0].shape is not None and resize.inputs[0].shape.rank() != 4
    ):
        return None
    if scales[0] != 1 or scales[1] != 1:
        return None
    factors = scales[2:]
    if np.any(factors < 1) or np.any(factors != np.floor(factors)):
        return None
    sh, sw = (int(f) for f in factors)
    if sh == sw == 1:
        return None
    return sh, sw


class ResizeOnIntegersPass(ir.passes.InPlacePass):
    """Runs `DequantizeLinear -> Resize -> QuantizeLinear` as a broadcast of the integers.

    See the module docstring. The DequantizeLinear stays while others read it.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        names = NameAllocator(graph)
        modified = False
        for resize in list(graph):
            factors = integer_factors(resize, opset)
            if factors is None:
                continue
            match = qdq_around(resize)
            if match is None:
                continue
            _, quantize, integers, _ = match
            chain = _repeat_chain(
                graph, names, integers, factors, resize.name or "resize", opset
            )
            graph.insert_before(resize, chain)
            take_place_of(graph, quantize, chain[-1].outputs[0])
            modified = True
        if modified:
            RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=modified)


def _repeat_chain(
    graph: ir.Graph,
    names: NameAllocator,
    integers: ir.Value,
    factors: tuple[int, int],
    base: str,
    opset: int,
) -> list[ir.Node]:
    """Transpose -> Unsqueeze -> Expand -> Reshape -> Transpose (the module docstring)."""
    sh, sw = factors

    def node(op_type: str, inputs: list[ir.Value], suffix: str, **attributes) -> ir.Node:
        output = ir.Value(name=names.fresh(f"{base}_{suffix}"))
        if op_type != "Shape" and op_type != "Mul":
            output.type = integers.type
        return ir.node(
            op_type,
            inputs,
            attributes,
            name=names.fresh(f"{base}_{op_type}"),
            outputs=[output],
        )

    def constant(suffix: str, values: list[int]) -> ir.Value:
        return add_initializer(
            graph, names.fresh(f"{base}_{suffix}"), np.array(values, np.int64)
        )

    nhwc = node("Transpose", [integers], "nhwc", perm=[0, 2, 3, 1])
    if opset >= _UNSQUEEZE_AXES_AS_INPUT:
        unsqueeze = node("Unsqueeze", [nhwc.outputs[0], constant("axes", [2, 4])], "blocks")
    else:
        unsqueeze = node("Unsqueeze", [nhwc.outputs[0]], "blocks", axes=[2, 4])
    expand = node(
        "Expand", [unsqueeze.outputs[0], constant("repeats", [1, 1, sh, 1, sw, 1])], "repeated"
    )
    shape = node("Shape", [nhwc.outputs[0]], "shape")
    target = node("Mul", [shape.outputs[0], constant("factors", [1, sh, sw, 1])], "target")
    reshape = node("Reshape", [expand.outputs[0], target.outputs[0]], "upsampled_nhwc")
    nchw = node("Transpose", [reshape.outputs[0]], "upsampled", perm=[0, 3, 1, 2])
    return [nhwc, unsqueeze, expand, shape, target, reshape, nchw]
