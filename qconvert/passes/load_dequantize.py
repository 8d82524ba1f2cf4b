"""Integers read as floats through Mul(Cast(W_q), scale): dequantized once, at load time.

onnxruntime keeps a weight's DequantizeLinear unfolded (its QDQ fusions look for it), so a
float node that reads one gets its weight recomputed at every run: an embedding table of
30522 x 384 cost 3.8 ms a run on a transformer encoder, a float Conv lost its NCHWc kernel.
Cast and Mul of initializers are ordinary constant subgraphs, which onnxruntime folds into
one float initializer when it loads the model. The values are those DequantizeLinear
gives with zero point 0: float(W_q) x scale, rounded once in float32.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qconvert.graph_utils import add_initializer
from qconvert.names import NameAllocator
from qconvert.qparams import QParams


def foldable(params: QParams) -> bool:
    """Whether these parameters can be read this way (zero points of 0: symmetric)."""
    return not np.any(params.zero_point)


def dequantized_at_load(
    home: ir.Graph, names: NameAllocator, integers: ir.Value, params: QParams, base: str
) -> ir.Value:
    """The float value Mul(Cast(integers), scale), built in `home`.

    `integers` is an initializer of `home` (or of a graph around it); the scale is stored
    beside it, shaped to broadcast along the quantization axis.
    """
    scale = params.scale.astype(np.float32)
    shape = integers.shape
    if params.axis is None:
        scale = scale.reshape(())
    else:
        broadcast = [1] * len(shape)
        broadcast[params.axis] = scale.size
        scale = scale.reshape(broadcast)
    factor = add_initializer(home, names.fresh(f"{base}_scale"), scale)
    cast = ir.node(
        "Cast",
        [integers],
        attributes={"to": int(ir.DataType.FLOAT)},
        name=names.fresh(f"{base}_Cast"),
        outputs=[ir.Value(name=names.fresh(f"{base}_float"))],
    )
    multiply = ir.node(
        "Mul",
        [cast.outputs[0], factor],
        name=names.fresh(f"{base}_Mul"),
        outputs=[
            ir.Value(
                name=names.fresh(f"{base}_dequantized"),
                shape=shape,
                type=ir.TensorType(ir.DataType.FLOAT),
            )
        ],
    )
    home.extend([cast, multiply])
    return multiply.outputs[0]
