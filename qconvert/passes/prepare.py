"""Preparation: make a float model ready to plan, without changing what it computes.

0. Nodes and values without names get unique ones, so the plan can refer to each.
1. Constants held in `Constant` nodes become initializers, so every weight looks the same.
2. The ai.onnx opset is raised to what the scheme needs (per-axis DequantizeLinear needs 13).
3. BatchNormalization after a Conv is folded into the Conv's weights:
       s = gamma / sqrt(var + eps),  W' = W * s (per output channel),  b' = (b - mean) * s + beta
   The folded Conv writes the tensor the BatchNormalization wrote, under the same name, so
   calibration statistics gathered on the original model still apply.
4. Shapes and types are inferred, so planning knows which tensors are float.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir
from onnx_ir.passes.common import (
    LiftConstantsToInitializersPass,
    NameFixPass,
    RemoveUnusedNodesPass,
    ShapeInferencePass,
)

from qconvert.errors import UnsupportedModelError
from qconvert.graph_utils import add_initializer, constant_array
from qconvert.names import NameAllocator


class UpgradeOpsetPass(ir.passes.FunctionalPass):
    """Raises the model's ai.onnx opset to at least `min_opset` with the ONNX converter.

    The converter works on protobuf, so an upgraded model is a new object.
    """

    def __init__(self, *, min_opset: int) -> None:
        super().__init__()
        self.min_opset = min_opset

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        current = model.opset_imports.get("", 1)
        if current >= self.min_opset:
            return ir.passes.PassResult(model.clone(), modified=False)
        try:
            proto = onnx.version_converter.convert_version(
                ir.serde.serialize_model(model), self.min_opset
            )
        except Exception as exc:  # the converter raises bare RuntimeErrors of many kinds
            raise UnsupportedModelError(
                f"The model's opset {current} cannot be upgraded to {self.min_opset}, "
                f"which the scheme needs: {str(exc).splitlines()[0]}"
            ) from None
        return ir.passes.PassResult(ir.serde.deserialize_model(proto), modified=True)


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Folds each BatchNormalization that follows a Conv into the Conv's weight and bias.

    A pair is folded when the Conv output feeds only the BatchNormalization and all the
    parameters involved are constant.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        modified = False
        for bn in list(graph):
            if bn.op_type != "BatchNormalization" or len(bn.outputs) != 1:
                continue
            conv = bn.inputs[0].producer() if bn.inputs[0] is not None else None
            if conv is None or conv.op_type != "Conv" or len(bn.inputs[0].consumers()) != 1:
                continue
            if bn.inputs[0].is_graph_output():
                continue
            arrays = [constant_array(v) for v in bn.inputs[1:5]]
            weight = constant_array(conv.inputs[1])
            if weight is None or any(a is None for a in arrays):
                continue
            bias = constant_array(conv.inputs[2]) if len(conv.inputs) > 2 else None
            if len(conv.inputs) > 2 and conv.inputs[2] is not None and bias is None:
                continue
            gamma, beta, mean, var = (a.astype(np.float64) for a in arrays)
            epsilon = bn.attributes.get_float("epsilon", 1e-5)
            factor = gamma / np.sqrt(var + epsilon)
            shape = (-1,) + (1,) * (weight.ndim - 1)
            new_weight = (weight.astype(np.float64) * factor.reshape(shape)).astype(
                weight.dtype
            )
            old_bias = np.zeros_like(mean) if bias is None else bias.astype(np.float64)
            new_bias = ((old_bias - mean) * factor + beta).astype(weight.dtype)
            weight_value = add_initializer(
                graph, names.fresh(f"{conv.name}_folded_weight"), new_weight
            )
            bias_value = add_initializer(
                graph, names.fresh(f"{conv.name}_folded_bias"), new_bias
            )
            conv.replace_input_with(1, weight_value)
            if len(conv.inputs) > 2:
                conv.replace_input_with(2, bias_value)
            else:
                conv.resize_inputs(3)
                conv.replace_input_with(2, bias_value)
            # The Conv takes over the BatchNormalization's output, name included.
            conv_output, bn_output = conv.outputs[0], bn.outputs[0]
            bn_output.replace_all_uses_with(conv_output, replace_graph_outputs=True)
            name = bn_output.name
            graph.remove(bn, safe=True)
            conv_output.name = name
            modified = True
        if modified:
            RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=modified)


def prepare(model: ir.Model, *, min_opset: int) -> ir.Model:
    """Runs the preparation passes in order; the model is changed in place."""
    passes = ir.passes.PassManager(
        [
            NameFixPass(),
            LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            UpgradeOpsetPass(min_opset=min_opset),
            FoldBatchNormPass(),
            ShapeInferencePass(),
        ]
    )
    return passes(model).model
