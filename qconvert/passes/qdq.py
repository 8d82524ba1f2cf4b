"""Apply a `QuantPlan` as QuantizeLinear/DequantizeLinear pairs (the QDQ format).

1. Activation T: `Q(T) -> DQ -> T'`, and every consumer of T reads T'. onnxruntime
   recognizes `DQ -> op -> Q` groups and runs them as integer kernels.
2. Weight W: stored as its integer tensor W_q and read through `DQ(W_q)` (per axis when the
   plan says so); the float W is dropped. A weight only float arithmetic reads (a
   classifier head, a thin Conv between float ops, an embedding table) is read through
   `Mul(Cast(W_q), scale)` instead, which onnxruntime folds into a float initializer when
   it loads the model (`load_dequantize`).
3. Bias B: stored as int32 at scale input scale x weight scale, read through DQ. A
   per-channel bias scale is written as Mul(input scale, weight scale), not stored.
4. Relu/Clip nodes the plan folds: Q reads the first clamp's input, and the clamps go.
5. The plan's float readers keep reading T itself (after a folded clamp, the clamp's
   output, so the clamp stays for them): onnxruntime would run a float Conv, ConvTranspose
   or Gemm that reads a DequantizeLinear as an integer kernel after all.
6. Mul(T, c) by a positive constant the plan folds: its readers read DQ(T_q) at scale
   s x c, exactly (T_q - z) x s x c, and the Mul goes.

Graph outputs keep their names and stay float. New names are short, since on a small model
they weigh as much as a few percent of the file: for a tensor T, `T_q` (its integers),
`T_scale`, `T_zp` (zero point), nodes `T_Q` and `T_DQ`, and `T_dequantized`, the name
compare --per-layer looks for.

Q/DQ nodes are ai.onnx ops; where int16 tensors meet a model that cannot be raised to
opset 21, they can be written in onnxruntime's `com.microsoft` domain instead (`domain`),
whose QuantizeLinear/DequantizeLinear take int16 at any opset.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from qconvert import qparams
from qconvert.graph_utils import HOLDERS, add_initializer, body_nodes, values_by_name
from qconvert.names import NameAllocator
from qconvert.passes.load_dequantize import dequantized_at_load, foldable
from qconvert.plan import QuantPlan, Role, TensorDecision


class InsertQDQPass(ir.passes.InPlacePass):
    """Rewrites the model as the plan says, with Q/DQ nodes (see the module docstring)."""

    def __init__(self, *, plan: QuantPlan, domain: str = "") -> None:
        super().__init__()
        self.plan = plan
        self.domain = domain

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameAllocator(graph)
        parameters = _ParameterStore(graph, names)
        values = values_by_name(graph)
        for holder in graph:  # the plan also decides tensors inside If/Loop/Scan bodies
            if holder.op_type in HOLDERS:
                for node in body_nodes(holder):
                    values.update((value.name, value) for value in node.inputs if value)
                    values.update((value.name, value) for value in node.outputs)
        folded = {fold.output: fold for fold in self.plan.folds}
        scaled = {fold.output: fold.source for fold in self.plan.scale_folds}
        float_nodes = self.plan.float_readers
        quantized = frozenset(node.name for node in self.plan.quantized_nodes())
        # The integers each activation is stored as: its QuantizeLinear's output.
        integers: dict[str, ir.Value] = {}
        for decision in self.plan.tensors.values():
            value = values[decision.name]
            if decision.role is Role.ACTIVATION and value.name in scaled:
                integers[value.name] = integers[scaled[value.name]]
                _dequantize_scaled(
                    graph,
                    names,
                    parameters,
                    value,
                    integers[value.name],
                    decision,
                    self.domain,
                )
            elif decision.role is Role.ACTIVATION:
                source = values[folded[value.name].source] if value.name in folded else value
                integers[value.name] = _quantize_activation(
                    graph, names, parameters, value, source, decision, self.domain, float_nodes
                )
            elif _read_in_float_only(value, decision, quantized) and not self.domain:
                _store_decompressed_at_load(graph, names, value, decision)
            else:
                scale = _bias_scale_product(graph, names, parameters, decision, self.plan)
                _quantize_constant(
                    graph, names, parameters, value, decision, self.domain, scale
                )
        if self.domain and self.plan.tensors:
            model.opset_imports.setdefault(self.domain, 1)
        # Folded clamps and replaced float weights are no longer read: drop them.
        RemoveUnusedNodesPass()(model)
        TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified=bool(self.plan.tensors))


def _quantize_activation(
    graph: ir.Graph,
    names: NameAllocator,
    parameters: _ParameterStore,
    value: ir.Value,
    source: ir.Value,
    decision: TensorDecision,
    domain: str,
    float_nodes: frozenset[str],
) -> ir.Value:
    """Inserts Q(source) -> DQ and points the readers of `value` at the DQ output.

    Returns the Q output.

    The plan's float readers (`float_nodes`) keep reading the float tensor: onnxruntime
    would fuse a float Conv or Gemm that reads a DequantizeLinear into an integer kernel,
    quantizing a node the user excluded.
    """
    scale, zero_point = parameters.get(decision)
    dequantized = ir.Value(name=names.fresh(f"{decision.name}_dequantized"))
    # Readers are redirected first, so the new QuantizeLinear keeps reading the float value.
    for node, index in list(value.uses()):
        if node.name not in float_nodes:
            node.replace_input_with(index, dequantized)
    quantize = ir.node(
        "QuantizeLinear",
        [source, scale, zero_point],
        domain=domain,
        name=names.fresh(f"{decision.name}_Q"),
        outputs=[ir.Value(name=names.fresh(f"{decision.name}_q"))],
    )
    dequantize = ir.node(
        "DequantizeLinear",
        [quantize.outputs[0], scale, zero_point],
        domain=domain,
        name=names.fresh(f"{decision.name}_DQ"),
        outputs=[dequantized],
    )
    _copy_type(source, quantize.outputs[0], decision.qparams.dtype)
    _copy_type(source, dequantized, None)
    # The pair goes where the tensor is computed: the main graph, or a body (whose
    # inputs have no producer), and reads its parameters from the main graph.
    owner = source.producer().graph if source.producer() is not None else source.graph
    (owner if owner is not None else graph).extend([quantize, dequantize])
    return quantize.outputs[0]


def _dequantize_scaled(
    graph: ir.Graph,
    names: NameAllocator,
    parameters: _ParameterStore,
    value: ir.Value,
    integers: ir.Value,
    decision: TensorDecision,
    domain: str,
) -> None:
    """Reads `value`, a Mul of a quantized tensor by a constant, as DQ of its integers.

    The Mul loses its readers and goes with the unused nodes.
    """
    scale, zero_point = parameters.get(decision)
    dequantize = ir.node(
        "DequantizeLinear",
        [integers, scale, zero_point],
        domain=domain,
        name=names.fresh(f"{decision.name}_DQ"),
        outputs=[ir.Value(name=names.fresh(f"{decision.name}_dequantized"))],
    )
    _copy_type(value, dequantize.outputs[0], None)
    value.replace_all_uses_with(dequantize.outputs[0])
    # Beside the Mul it replaces: inside an If/Loop/Scan body when the Mul is there.
    owner = value.producer().graph if value.producer() is not None else None
    (owner if owner is not None else graph).extend([dequantize])


def _quantize_constant(
    graph: ir.Graph,
    names: NameAllocator,
    parameters: _ParameterStore,
    value: ir.Value,
    decision: TensorDecision,
    domain: str,
    product_scale: ir.Value | None = None,
) -> None:
    """Stores a weight or bias as integers, read through DequantizeLinear.

    `product_scale`, when given, is the scale to read the integers at (a bias's).
    """
    params = decision.qparams
    array = value.const_value.numpy()
    if decision.role is Role.BIAS:
        # int32 holds any bias at this scale unless the weights are all but zero.
        info = np.iinfo(np.int32)
        integers = np.clip(
            np.rint(array.astype(np.float64) / params.scale.astype(np.float64)),
            info.min,
            info.max,
        ).astype(np.int32)
    else:
        integers = qparams.quantize(array, params)
    # One DequantizeLinear in each graph that reads the weight: onnxruntime fuses a group
    # only from DequantizeLinear nodes of the group's own graph, not of an outer scope.
    readers: dict[int, tuple[ir.Graph, list[tuple[ir.Node, int]]]] = {}
    for node, index in value.uses():
        owner = node.graph if node.graph is not None else graph
        readers.setdefault(id(owner), (owner, []))[1].append((node, index))
    scale, zero_point = parameters.get(decision)
    home = graph
    if product_scale is not None and all(owner is graph for owner, _ in readers.values()):
        scale = product_scale
    elif len(readers) == 1:
        # A weight only a body reads is stored in that body, parameters too: onnxruntime's
        # fusions look a DequantizeLinear's initializers up in its own graph only.
        home = next(iter(readers.values()))[0]
    stored = add_initializer(home, names.fresh(f"{decision.name}_q"), integers)
    if home is not graph:
        scale, zero_point = (
            add_initializer(home, names.fresh(v.name), v.const_value.numpy())
            for v in (scale, zero_point)
        )
    attributes = {"axis": params.axis} if params.axis is not None else {}
    # An int32 bias has zero point 0, DequantizeLinear's default: storing it would only
    # add bytes (onnxruntime's fusions accept the bias without it).
    inputs = [stored, scale] if decision.role is Role.BIAS else [stored, scale, zero_point]
    for owner, uses in readers.values():
        dequantize = ir.node(
            "DequantizeLinear",
            inputs,
            attributes=attributes,
            domain=domain,
            name=names.fresh(f"{decision.name}_DQ"),
            outputs=[
                ir.Value(
                    name=names.fresh(f"{decision.name}_dequantized"),
                    shape=ir.Shape(array.shape),
                    type=ir.TensorType(ir.DataType.FLOAT),
                )
            ],
        )
        for node, index in uses:
            node.replace_input_with(index, dequantize.outputs[0])
        owner.extend([dequantize])
    graph.initializers.pop(value.name, None)


def _read_in_float_only(
    value: ir.Value, decision: TensorDecision, quantized: frozenset[str]
) -> bool:
    """Whether `value` is a weight only float arithmetic reads.

    That is nodes left float, and Gathers of an embedding table, which gather float rows
    from the whole dequantized table.
    """
    return (
        decision.role is Role.WEIGHT
        and foldable(decision.qparams)
        and all(
            node.name not in quantized or (node.op_type == "Gather" and index == 0)
            for node, index in value.uses()
        )
    )


def _store_decompressed_at_load(
    graph: ir.Graph, names: NameAllocator, value: ir.Value, decision: TensorDecision
) -> None:
    """Stores a weight of float arithmetic as integers dequantized at load time.

    See `load_dequantize`: a small depthwise classifier, whose float 5x5 depthwise Convs read
    DequantizeLinear, ran 1.33 ms instead of 0.69 ms.
    """
    integers = qparams.quantize(value.const_value.numpy(), decision.qparams)
    owners = {id(node.graph): node.graph for node, _ in value.uses() if node.graph is not None}
    # A weight only a body reads stays in that body; others go in the main graph.
    home = next(iter(owners.values())) if len(owners) == 1 else graph
    stored = add_initializer(home, names.fresh(f"{decision.name}_q"), integers)
    value.replace_all_uses_with(
        dequantized_at_load(home, names, stored, decision.qparams, decision.name)
    )
    graph.initializers.pop(value.name, None)


# A Mul node and its names take about as many bytes as 16 float scales.
_MIN_PRODUCT_CHANNELS = 16


def _bias_scale_product(
    graph: ir.Graph,
    names: NameAllocator,
    parameters: _ParameterStore,
    decision: TensorDecision,
    plan: QuantPlan,
) -> ir.Value | None:
    """A per-channel bias scale written as Mul(input scale, weight scale), when it is one.

    The product is known from the two scales the file holds anyway: storing it again would
    add 4 bytes per output channel, 2% of a depthwise network's file. Runtimes fold the
    constant Mul when they load the model (onnxruntime before it fuses the QDQ groups), so
    the integer kernels are the same. The product is checked bit for bit: float32 Mul is
    what the planner computed the scale with.
    """
    factors = decision.scale_product_of
    params = decision.qparams
    if factors is None or params.axis is None or params.scale.size < _MIN_PRODUCT_CHANNELS:
        return None
    if any(name not in plan.tensors for name in factors):
        return None
    input_params, weight_params = (plan.tensors[name].qparams for name in factors)
    product = np.float32(input_params.scale.reshape(())) * weight_params.scale.astype(
        np.float32
    )
    if input_params.scale.size != 1 or not np.array_equal(product, params.scale):
        return None
    input_scale = parameters.get(plan.tensors[factors[0]])[0]
    weight_scale = parameters.get(plan.tensors[factors[1]])[0]
    multiply = ir.node(
        "Mul",
        [input_scale, weight_scale],
        name=names.fresh(f"{decision.name}_scale_Mul"),
        outputs=[
            ir.Value(
                name=names.fresh(f"{decision.name}_scale"),
                shape=ir.Shape(params.scale.shape),
                type=ir.TensorType(ir.DataType.FLOAT),
            )
        ],
    )
    graph.extend([multiply])
    return multiply.outputs[0]


class _ParameterStore:
    """Scale and zero-point initializers, one per distinct value.

    Tensors that share parameters (a MaxPool's output and its input, say) then share the
    initializers too: a smaller file, and onnxruntime sees at a glance that they match.
    Zero points are shared on their own as well: most tensors of a model have the same
    one (0 for every symmetric weight), so one initializer serves them all.
    """

    def __init__(self, graph: ir.Graph, names: NameAllocator) -> None:
        self.graph = graph
        self.names = names
        self.scales: dict[tuple, ir.Value] = {}
        self.zero_points: dict[tuple, ir.Value] = {}

    def get(self, decision: TensorDecision) -> tuple[ir.Value, ir.Value]:
        params = decision.qparams
        per_axis = params.axis is not None
        scale = params.scale if per_axis else params.scale.reshape(())
        zero_point = params.zero_point if per_axis else params.zero_point.reshape(())
        return (
            self._stored(self.scales, scale, f"{decision.name}_scale"),
            self._stored(self.zero_points, zero_point, f"{decision.name}_zp"),
        )

    def _stored(self, store: dict[tuple, ir.Value], array: np.ndarray, name: str) -> ir.Value:
        key = (array.shape, array.dtype.str, array.tobytes())
        if key not in store:
            store[key] = add_initializer(self.graph, self.names.fresh(name), array)
        return store[key]


def _copy_type(source: ir.Value, target: ir.Value, dtype: np.dtype | None) -> None:
    if source.shape is not None:
        target.shape = source.shape
    if dtype is not None:
        target.type = ir.TensorType(ir.DataType.from_numpy(dtype))
    elif source.type is not None:
        target.type = source.type
