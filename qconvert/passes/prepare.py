"""Preparation: make a float model ready to plan, without changing what it computes.

0. Nodes and values without names get unique ones, so the plan can refer to each.
1. Constants held in `Constant` nodes become initializers, so every weight looks the same;
   those inside If/Loop/Scan bodies move to the main graph (subgraphs read outer values).
2. The ai.onnx opset is raised to what the scheme needs (per-axis DequantizeLinear needs 13),
   and one step further (14) for a model that spells HardSwish out in four ops (step 5).
3. Identity/Cast/Reshape/Transpose/Squeeze/Unsqueeze/Flatten of constants are folded into
   initializers, so a weight an exporter reads through such a chain is quantized as one.
4. BatchNormalization after a Conv, ConvTranspose or Gemm is folded into its weights:
       s = gamma / sqrt(var + eps),  W' = W * s (per output channel),
       b' = (b - mean) * s + beta
   The folded node writes the tensor the BatchNormalization wrote, under the same name, so
   calibration statistics gathered on the original model still apply.
5. Activations exporters spell out in elementary ops are rewritten into forms the quantizer
   serves better (`passes/activations.py`): a constant Add after a Conv becomes its bias,
   HardSigmoid after a Conv becomes a scaled Conv and Clip(0, 1), and x*Clip(x+3,0,6)/6
   becomes HardSwish.
6. A constant Pad before a Conv, AveragePool or MaxPool is folded into the reader's pads
   where the result is identical (`passes/pad.py`), so no Pad runs between two integer
   kernels.
7. Shapes and types are inferred, so planning knows which tensors are float.
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
from qconvert.graph_utils import add_initializer, constant_array, replace_keeping_name
from qconvert.names import NameAllocator
from qconvert.passes.activations import (
    HARDSWISH_OPSET,
    FoldConvAddIntoBiasPass,
    FoldHardSigmoidIntoConvPass,
    FuseHardSwishPass,
    has_decomposed_hardswish,
)
from qconvert.passes.pad import FoldPadIntoReaderPass


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
        except Exception as exc:  # noqa: BLE001 - the converter raises errors of many kinds
            raise UnsupportedModelError(
                f"The model's opset {current} cannot be upgraded to {self.min_opset}, "
                f"which the scheme needs: {str(exc).splitlines()[0]}"
            ) from None
        return ir.passes.PassResult(ir.serde.deserialize_model(proto), modified=True)


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Folds BatchNormalization into the Conv, ConvTranspose or Gemm before it.

    The producer's weight and bias absorb the normalization. A pair is folded when the
    producer's output feeds only the BatchNormalization, all the parameters involved are
    constant, and the output channel is a whole axis of the weight: axis 0 of a Conv's,
    axis 1 of a ConvTranspose's with group 1, the output column of a Gemm's (alpha = beta =
    1, 2-D output, channels on axis 1).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        modified = False
        for bn in list(graph):
            if bn.op_type != "BatchNormalization" or len(bn.outputs) != 1:
                continue
            producer = bn.inputs[0].producer() if bn.inputs[0] is not None else None
            if producer is None or len(bn.inputs[0].consumers()) != 1:
                continue
            if bn.inputs[0].is_graph_output():
                continue
            axis = _output_channel_axis(producer)
            arrays = [constant_array(v) for v in bn.inputs[1:5]]
            weight = constant_array(producer.inputs[1]) if len(producer.inputs) > 1 else None
            if axis is None or weight is None or any(a is None for a in arrays):
                continue
            bias = constant_array(producer.inputs[2]) if len(producer.inputs) > 2 else None
            if len(producer.inputs) > 2 and producer.inputs[2] is not None and bias is None:
                continue
            gamma, beta, mean, var = (a.astype(np.float64) for a in arrays)
            if weight.shape[axis] != gamma.shape[0] or (bias is not None and bias.ndim != 1):
                continue
            epsilon = bn.attributes.get_float("epsilon", 1e-5)
            factor = gamma / np.sqrt(var + epsilon)
            shape = [1] * weight.ndim
            shape[axis] = -1
            new_weight = (weight.astype(np.float64) * factor.reshape(shape)).astype(
                weight.dtype
            )
            old_bias = np.zeros_like(mean) if bias is None else bias.astype(np.float64)
            new_bias = ((old_bias - mean) * factor + beta).astype(weight.dtype)
            weight_value = add_initializer(
                graph, names.fresh(f"{producer.name}_folded_weight"), new_weight
            )
            bias_value = add_initializer(
                graph, names.fresh(f"{producer.name}_folded_bias"), new_bias
            )
            producer.replace_input_with(1, weight_value)
            if len(producer.inputs) < 3:
                producer.resize_inputs(3)
            producer.replace_input_with(2, bias_value)
            replace_keeping_name(graph, bn, producer.outputs[0])
            modified = True
        if modified:
            RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=modified)


def _output_channel_axis(node: ir.Node) -> int | None:
    """The axis of `node`'s weight that holds its output channels, if BN can fold into it."""
    if node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
        return None
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1 if node.attributes.get_int("group", 1) == 1 else None
    if node.op_type == "Gemm":
        attributes = node.attributes
        if (
            attributes.get_float("alpha", 1.0) != 1.0
            or attributes.get_float("beta", 1.0) != 1.0
        ):
            return None
        return 0 if attributes.get_int("transB", 0) else 1
    return None


_CONSTANT_FOLDABLE = frozenset(
    {"Identity", "Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"}
)


class FoldConstantChainsPass(ir.passes.InPlacePass):
    """Replaces shape and type ops on constants by the initializer they compute.

    Identity/Cast/Reshape/Transpose/Squeeze/Unsqueeze/Flatten nodes whose inputs are all
    constant give way to an initializer of the same name. Some exporters write a weight as
    an initializer (or a Constant) read through such a chain; folded, it is a plain
    initializer the planner quantizes as a weight. Casts to anything but a float type are
    left alone (they feed shapes, not weights).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type not in _CONSTANT_FOLDABLE or node.domain not in ("", "ai.onnx"):
                continue
            output = node.outputs[0]
            if output.is_graph_output() or not node.inputs or node.inputs[0] is None:
                continue
            arrays = [constant_array(v) if v is not None else None for v in node.inputs]
            if any(
                a is None for a, v in zip(arrays, node.inputs, strict=True) if v is not None
            ):
                continue
            folded = _evaluate(node, arrays)
            if folded is None:
                continue
            name = output.name
            value = ir.Value(
                name=f"{name}__folding",
                shape=ir.Shape(folded.shape),
                type=ir.TensorType(ir.DataType.from_numpy(folded.dtype)),
                const_value=ir.tensor(folded),
            )
            output.replace_all_uses_with(value)
            graph.remove(node, safe=True)
            value.name = name
            value.const_value.name = name
            graph.register_initializer(value)
            modified = True
        if modified:
            RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=modified)


def _evaluate(node: ir.Node, arrays: list[np.ndarray | None]) -> np.ndarray | None:
    """What one constant-foldable node computes, or None when it is not simple."""
    data = arrays[0]
    op, attributes = node.op_type, node.attributes
    if op == "Identity":
        return data
    if op == "Cast":
        target = ir.DataType(attributes.get_int("to", 0))
        if target not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE):
            return None
        return data.astype(target.numpy())
    if op == "Transpose":
        perm = attributes.get_ints("perm", None)
        return np.transpose(data, perm)
    if op == "Flatten":
        axis = attributes.get_int("axis", 1) % max(data.ndim, 1)
        return data.reshape(int(np.prod(data.shape[:axis])), -1)
    if op == "Reshape":
        if len(arrays) < 2 or arrays[1] is None or attributes.get_int("allowzero", 0):
            return None
        shape = [data.shape[i] if dim == 0 else int(dim) for i, dim in enumerate(arrays[1])]
        return data.reshape(shape)
    axes = arrays[1] if len(arrays) > 1 and arrays[1] is not None else None
    if axes is None:
        axes = attributes.get_ints("axes", None)
    if op == "Squeeze":
        return np.squeeze(data, axis=None if axes is None else tuple(int(a) for a in axes))
    if op == "Unsqueeze" and axes is not None:
        rank = data.ndim + len(axes)
        return np.expand_dims(data, tuple(sorted(int(a) % rank for a in axes)))
    return None


class HoistSubgraphInitializersPass(ir.passes.InPlacePass):
    """Moves the initializers of If/Loop/Scan bodies into the main graph.

    A subgraph may read any value of the graphs around it, so the model computes the same;
    the weights inside control flow are then main-graph initializers the planner can store
    as int8, read through a DequantizeLinear the subgraph sees from the outer scope.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        main = model.graph
        names = NameAllocator(main)
        modified = False
        for subgraph in subgraphs(main):
            for name in list(subgraph.initializers):
                value = subgraph.initializers.pop(name)
                if value.is_graph_input() or value.const_value is None:
                    subgraph.initializers[name] = value
                    continue
                value.name = names.fresh(f"{name}")
                value.const_value.name = value.name
                main.register_initializer(value)
                modified = True
        return ir.passes.PassResult(model, modified=modified)


def subgraphs(graph: ir.Graph) -> list[ir.Graph]:
    """Every subgraph (If branches, Loop and Scan bodies) nested in `graph`, at any depth."""
    found = []
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for attribute in node.attributes.values():
            if attribute.type == ir.AttributeType.GRAPH:
                found.append(attribute.value)
            elif attribute.type == ir.AttributeType.GRAPHS:
                found.extend(attribute.value)
    return found


def prepare(model: ir.Model, *, min_opset: int) -> ir.Model:
    """Runs the preparation passes in order; the model is changed in place."""
    lifted = ir.passes.PassManager(
        [
            NameFixPass(),
            LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            HoistSubgraphInitializersPass(),
        ]
    )(model).model
    target = _opset_for_hardswish(lifted, min_opset)
    try:
        return _upgrade_and_fold(lifted, target)
    except UnsupportedModelError:
        if target == min_opset:
            raise
    # The converter could not go the extra step to HardSwish's opset; the upgrade is a
    # functional pass, so `lifted` is untouched and the scheme's own opset still serves.
    return _upgrade_and_fold(lifted, min_opset)


def _opset_for_hardswish(model: ir.Model, min_opset: int) -> int:
    """`min_opset`, or the HardSwish opset where that helps.

    That is when the model spells HardSwish out in four ops and the scheme raises the
    opset anyway (quantization reads one float HardSwish between
    one Q/DQ pair, against a float HardSigmoid, a quantized gate and an integer Mul below;
    on PP-OCR's classifier that is 1.6 points of agreement and a tenth of the latency).
    """
    current = model.opset_imports.get("", 1)
    if min_opset <= current or min_opset >= HARDSWISH_OPSET:
        return min_opset
    if not has_decomposed_hardswish(model.graph):
        return min_opset
    return HARDSWISH_OPSET


def _upgrade_and_fold(model: ir.Model, min_opset: int) -> ir.Model:
    passes = ir.passes.PassManager(
        [
            UpgradeOpsetPass(min_opset=min_opset),
            NameFixPass(),  # values the opset converter added have no names
            FoldConstantChainsPass(),
            # A bias Add between a Conv and its BatchNormalization would stop the BN fold;
            # one after the BN fold is an Add the fold left behind it.
            FoldConvAddIntoBiasPass(),
            FoldBatchNormPass(),
            FoldConvAddIntoBiasPass(),
            FoldHardSigmoidIntoConvPass(),
            FuseHardSwishPass(),
            FoldPadIntoReaderPass(),
            ShapeInferencePass(),
        ]
    )
    return passes(model).model
