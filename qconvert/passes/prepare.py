"""Preparation: make a float model ready to plan, without changing what it computes.

0. Nodes and values without names get unique ones, so the plan can refer to each.
1. Constants held in `Constant` nodes become initializers, so every weight looks the same;
   those inside If/Loop/Scan bodies move to the main graph (subgraphs read outer values).
2. The ai.onnx opset is raised to what the scheme needs (per-axis DequantizeLinear needs 13),
   and one step further (14) for a model that spells HardSwish out in four ops (step 5)
   (`passes/opset_upgrade.py`).
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
8. A one-channel strided Conv1d (an STFT front end) becomes a MatMul over frames
   (`passes/frames.py`), whose integer kernel can write its output in float.
9. A rank-2 MatMul's (1, N) bias becomes (N,) (`passes/matmul_bias.py`), so the layer
   runs as one integer kernel where it writes float.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import (
    NameFixPass,
    RemoveUnusedNodesPass,
)

from qconvert.errors import UnsupportedModelError
from qconvert.graph_utils import add_initializer, constant_array, replace_keeping_name
from qconvert.names import NameAllocator
from qconvert.passes.activations import (
    HARDSWISH_OPSET,
    FoldConvAddIntoBiasPass,
    FoldConvMulIntoWeightPass,
    FoldHardSigmoidIntoConvPass,
    FuseHardSwishPass,
    has_decomposed_hardswish,
)
from qconvert.passes.constants import LiftConstantsPass
from qconvert.passes.frames import ConvAsFramesPass
from qconvert.passes.matmul_bias import FlattenMatMulBiasPass
from qconvert.passes.opset_upgrade import UpgradeOpsetPass
from qconvert.passes.pad import FoldPadIntoReaderPass
from qconvert.passes.shapes import InferShapesPass


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
            # Scaled in place in the one float64 copy: the same products, without a
            # second weight-sized float64 temporary (its fresh pages were most of the
            # fold's time on a 46 MB CNN).
            scaled = weight.astype(np.float64)
            scaled *= factor.reshape(shape)
            new_weight = scaled.astype(weight.dtype)
            del scaled
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


class RestoreSequenceTypesPass(ir.passes.InPlacePass):
    """Gives sequence and optional values back the type onnx_ir's shape inference drops.

    Shape inference (`InferShapesPass`, as onnx_ir's `ShapeInferencePass`) merges only a
    dtype and a shape into each value, which makes a sequence of float tensors a float
    tensor; onnxruntime then refuses the model ("Type (tensor(float)) ... does not match
    expected type (seq(tensor(float)))"). An output whose op schema allows only sequences
    (SplitToSequence, SequenceConstruct, ...) or only optionals (Optional) gets that type
    around the element type it was given.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opset = model.opset_imports.get("", 1)
        modified = False
        for graph in model.graphs():
            for node in graph:
                modified |= _copy_carried_types(node)
                for value, kind in zip(node.outputs, _output_kinds(node, opset), strict=False):
                    if kind == "tensor" or value is None or value.type is None:
                        continue
                    if kind == "seq" and isinstance(value.type, ir.TensorType):
                        value.type = ir.SequenceType(value.type)
                    elif kind == "optional" and not isinstance(value.type, ir.OptionalType):
                        source = node.inputs[0] if node.inputs else None
                        inner = source.type if source is not None else None
                        if inner is None:
                            continue
                        value.type = ir.OptionalType(inner)
                    else:
                        continue
                    value.shape = None
                    modified = True
        return ir.passes.PassResult(model, modified=modified)


def _copy_carried_types(node: ir.Node) -> bool:
    """If/Loop outputs, and Identity's, take a sequence or optional type from their source.

    An If output is its branch's output; a Loop's first outputs are its body's carried
    values (after the condition); Identity passes its input on.
    """
    sources: list[ir.Value | None] = []
    if node.op_type == "If" and "then_branch" in node.attributes:
        sources = list(node.attributes["then_branch"].as_graph().outputs)
    elif node.op_type == "Loop" and "body" in node.attributes:
        sources = list(node.attributes["body"].as_graph().outputs)[1:]
    elif node.op_type == "Identity":
        sources = list(node.inputs)
    modified = False
    for value, source in zip(node.outputs, sources, strict=False):
        kind = source.type if source is not None else None
        if isinstance(kind, ir.SequenceType | ir.OptionalType) and value.type != kind:
            value.type = kind
            value.shape = None
            modified = True
    return modified


def _output_kinds(node: ir.Node, opset: int) -> list[str]:
    """Per output: 'seq' or 'optional' when the schema allows only those, else 'tensor'."""
    if node.domain not in ("", "ai.onnx"):
        return []
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        return []
    allowed = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
    kinds = []
    for index in range(len(node.outputs)):
        if not schema.outputs:
            break
        formal = schema.outputs[min(index, len(schema.outputs) - 1)]
        types = allowed.get(formal.type_str, [formal.type_str])
        if types and all(t.startswith("seq(") for t in types):
            kinds.append("seq")
        elif types and all(t.startswith("optional(") for t in types):
            kinds.append("optional")
        else:
            kinds.append("tensor")
    return kinds


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


def prepare(model: ir.Model, *, min_opset: int, in_place: bool = False) -> ir.Model:
    """Runs the preparation passes in order; returns the prepared model.

    The first passes (names, constants) change `model` in place; the folds run on the
    upgrade's copy. With `in_place`, a model that needs no upgrade is folded itself: for
    callers that hand over a copy of their own (the copy the upgrade makes otherwise took
    0.045 of the 0.34 CPU seconds `quantize --data` calibrates the bench's 64-sample
    text-orientation CNN in).
    """
    lifted = ir.passes.PassManager(
        [
            NameFixPass(),
            LiftConstantsPass(),
            HoistSubgraphInitializersPass(),
        ]
    )(model).model
    target = _opset_for_hardswish(lifted, min_opset)
    try:
        return _upgrade_and_fold(lifted, target, in_place=in_place)
    except UnsupportedModelError:
        if target == min_opset:
            raise
    # The converter could not go the extra step to HardSwish's opset; the upgrade is a
    # functional pass, so `lifted` is untouched and the scheme's own opset still serves.
    return _upgrade_and_fold(lifted, min_opset)


def _opset_for_hardswish(model: ir.Model, min_opset: int) -> int:
    """`min_opset`, or the HardSwish opset where that helps.

    That is when the model spells HardSwish out in four ops and the scheme raises the opset
    anyway (quantization reads one float HardSwish between one Q/DQ pair, against a float
    HardSigmoid, a quantized gate and an integer Mul below; on a small depthwise classifier
    that is 1.6 points of agreement and a tenth of the latency).
    """
    current = model.opset_imports.get("", 1)
    if min_opset <= current or min_opset >= HARDSWISH_OPSET:
        return min_opset
    if not has_decomposed_hardswish(model.graph):
        return min_opset
    return HARDSWISH_OPSET


def _upgrade_and_fold(model: ir.Model, min_opset: int, *, in_place: bool = False) -> ir.Model:
    current = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if not (in_place and current is not None and current >= min_opset):
        # Outside the manager, which would wrap the refusal the upgrade raises into a
        # PassError.
        model = UpgradeOpsetPass(min_opset=min_opset)(model).model
    passes = ir.passes.PassManager(
        [
            NameFixPass(),  # values the opset converter added have no names
            # nor do its Constants (Upsample's scales, when it becomes Resize) start as
            # initializers, which is how planning recognises constants.
            LiftConstantsPass(),
            FoldConstantChainsPass(),
            # A bias Add between a Conv and its BatchNormalization would stop the BN fold;
            # one after the BN fold is an Add the fold left behind it.
            FoldConvAddIntoBiasPass(),
            FoldBatchNormPass(),
            # A scale after the Conv (BN's, folded, or an affine layer's) before its Add.
            FoldConvMulIntoWeightPass(),
            FoldConvAddIntoBiasPass(),
            FoldHardSigmoidIntoConvPass(),
            FuseHardSwishPass(),
            FoldPadIntoReaderPass(),
            InferShapesPass(),
            RestoreSequenceTypesPass(),
            # After shape inference: it needs the signal's length. It types what it adds.
            ConvAsFramesPass(),
            # Needs the MatMul outputs' ranks, which shape inference gives.
            FlattenMatMulBiasPass(),
        ]
    )
    return passes(model).model
