"""Planning the static schemes (int8, 16x8): activations, weights, biases and folds.

The planner walks the graph once in topological order (each If/Loop/Scan followed by the
nodes of its bodies) and reads the op policy table (`ops.py`), the scheme and the
calibrated ranges. The graph patterns it looks for (GELU, Relu/Clip chains, global
pooling) are pure functions in `patterns`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from types import MappingProxyType

import numpy as np
import onnx_ir as ir

from qconvert import ops, qparams
from qconvert.calibration import TensorRange
from qconvert.errors import CalibrationDataError
from qconvert.graph_utils import HOLDERS, body_nodes, constant_array, subgraph_nodes
from qconvert.overrides import FLOAT, Overrides
from qconvert.plan.common import check_overrides, skip_reason
from qconvert.plan.decisions import (
    ClampFold,
    NodeDecision,
    QuantPlan,
    Role,
    ScaleFold,
    TensorDecision,
)
from qconvert.plan.patterns import (
    activation_indices,
    clamp_chain,
    clamp_is_exact,
    combined_bounds,
    gelu_nodes,
    globally_pooled,
)
from qconvert.schemes import (
    INT8,
    INT16X8,
    StaticScheme,
)
from qconvert.selection import NodeSelection

_UNCALIBRATED = (
    "calibration has no range for its input '{name}' (a tensor the opset upgrade added, or "
    "a calibration of another model): stays float"
)

MIXED_RANGE_RATIO = 100.0
"""A Concat whose inputs' ranges differ by more than this factor stays float."""

MIN_TABLE_ELEMENTS = 256
"""A constant operand of a float Add with fewer elements is a few offsets: left float."""

TABLE_STEP_FRACTION = 8.0
"""A float Add's constant table is stored as int8 only where its rounding step stays under
this fraction of an int8 step of the sum."""

_FEEDS_ANSWER = (
    "feeds only the last weighted layer, which reads its input in float: stays float"
)

_SHAPE_READERS = frozenset({"Shape", "Size"})

HEAD_FLOAT_MAX_WEIGHTS = 1 << 16
"""The largest classifier head (in weights) computed in float: beyond it the arithmetic
an int8 kernel saves counts (a 1000-class head of 1.28 M weights added 6 % of the float
model's latency to mobilenetv2_style_224's int8 run, measured when a float head still
dequantized its weights at every run)."""

THIN_CONV_MAX_CHANNELS = 8
"""A Conv reading at most this many input channels per output (a depthwise Conv reads one,
an image's first Conv three) is thin: too little arithmetic per output for int8 to pay
for the QuantizeLinear, DequantizeLinear and layout changes of an int8 island (see
`_thin_conv_island`)."""

BOUND_COVERAGE = 0.5
"""A tensor an op bounds (a Clip's output, a Sigmoid's) is quantized over the op's whole
output range when calibration already covered this share of it: at most one bit of
resolution is given up, and values the calibration set never reached (a gate that opens
fully on other data) are not clipped."""

_BOUNDED_OUTPUTS = {"Sigmoid": (0.0, 1.0)}
"""Quantized ops whose output lies in fixed bounds, whatever their input."""


def make_plan(
    model: ir.Model,
    scheme: StaticScheme,
    ranges: Mapping[str, TensorRange],
    *,
    excluded: frozenset[str] = frozenset(),
    selection: NodeSelection | None = None,
    overrides: Overrides | None = None,
    format: str = "qdq",
) -> QuantPlan:
    """Plans the static quantization of `model` with `scheme` and calibrated `ranges`.

    Nodes named in `excluded`, or left float by `selection` or `overrides`, stay float;
    their neighbours still quantize the tensors they share with them. `format` is how
    the plan will be written (qdq or qop): a MatMul and the Add of its bias make one
    layer only in QDQ, where onnxruntime fuses them into QGemm.
    """
    overrides = overrides or Overrides()
    check_overrides(model, overrides, static=True, scheme=scheme.name)
    selection = selection or NodeSelection()
    planner = _Planner(model, scheme, ranges, excluded, selection, overrides, format)
    return planner.run()


class _Planner:
    def __init__(
        self,
        model: ir.Model,
        scheme: StaticScheme,
        ranges: Mapping[str, TensorRange],
        excluded: frozenset[str],
        selection: NodeSelection,
        overrides: Overrides,
        format: str,
    ) -> None:
        self.graph = model.graph
        self.format = format
        self.scheme = scheme
        self.ranges = ranges
        self.excluded = excluded
        self.selection = selection
        self.overrides = overrides
        self.tensors: dict[str, TensorDecision] = {}
        self.nodes: dict[str, NodeDecision] = {}
        self.folds: list[ClampFold] = []
        self.scale_folds: list[ScaleFold] = []
        self.notes: list[str] = []
        # Tensors downstream of a mixed-range Concat, with the reason they stay float.
        self.held_float: dict[str, str] = {}
        self.float_readers: set[str] = set()
        self.feeds_mixed: dict[str, bool] = {}
        self.feeds_quantized: dict[str, bool] = {}
        self.answer_values: dict[str, bool] = {}
        self.feeds_answer: dict[str, bool] = {}

    def run(self) -> QuantPlan:
        self.gelu = gelu_nodes(self.graph)
        self.mixed = {
            node.name: reason
            for node in self._nodes()
            if node.op_type == "Concat" and (reason := self._mixed_range(node)) is not None
        }
        for node in self._nodes():
            if node.name in self.nodes:
                continue  # a clamp already folded into its producer
            skip = self._skip_reason(node)
            rule = ops.quantized_rule(node)
            if skip is not None or node.name in self.mixed:
                self.float_readers.add(node.name or "")
            if skip is not None:
                self._decide(node, False, skip)
            elif (held := self._held_float_input(node)) is not None:
                self._hold_float(node, held)
            elif node.name in self.gelu:
                self._decide(node, False, GELU_REASON)
            elif rule is not None:
                self._plan_quantized(node, rule)
            elif node.op_type in ops.PASS_THROUGH:
                self._plan_pass_through(node)
            else:
                self._decide(node, False, ops.float_reason(node))
        self._plan_subgraph_weights()
        self._plan_tables_of_float_adds()
        self.float_readers.update(self._readers_of_float_values())
        # onnxruntime quantizes the float weights of any Conv, ConvTranspose or Gemm whose
        # first input comes from a DequantizeLinear (its WeightBiasQuantization step): a
        # float one reads the float tensor, or it would run quantized after all.
        self.float_readers.update(
            decision.name
            for decision in self.nodes.values()
            if not decision.quantized and decision.op_type in ops.REQUANTIZED_OPS
        )
        # Graph order, for reports: a folded clamp is decided with its producer, before
        # its own turn.
        order = {node.name or "": index for index, node in enumerate(self._nodes())}
        return QuantPlan(
            scheme=self.scheme,
            tensors=MappingProxyType(dict(self.tensors)),
            nodes=tuple(
                sorted(self.nodes.values(), key=lambda d: order.get(d.name, len(order)))
            ),
            folds=tuple(self.folds),
            format=self.format,
            notes=tuple(self.notes),
            float_readers=frozenset(self.float_readers),
            scale_folds=tuple(self.scale_folds),
        )

    def _skip_reason(self, node: ir.Node) -> str | None:
        reason = skip_reason(node, self.selection, self.overrides, self.excluded)
        if reason is None and node.op_type == "Add":
            reason = self._mixed_range_add(node)
        return reason

    def _plan_tables_of_float_adds(self) -> None:
        """Stores the constant tables that float Adds read as int8, one scale per row.

        A positional embedding added to the residual stream is the case: the Add stays
        float with the stream, yet the table is a weight like any other. It is stored as
        int8 (one scale per row, the axis before the last) and read through
        DequantizeLinear, where its rounding stays under 1/TABLE_STEP_FRACTION of an int8
        step of the sum: a table of grid offsets in pixels (a detector's anchors) would
        round by more and stays float.
        """
        for node in self.graph:
            decision = self.nodes.get(node.name or "")
            if node.op_type != "Add" or decision is None or decision.quantized:
                continue
            if self._skip_reason(node) is not None:
                continue  # the user left it float: its operands too
            seen = self.ranges.get(node.outputs[0].name)
            if seen is None:
                continue
            sum_step = (seen.max - seen.min) / 255.0
            for value in node.inputs:
                table = constant_array(value)
                if (
                    table is None
                    or table.dtype != np.float32
                    or table.ndim < 2
                    or table.size < MIN_TABLE_ELEMENTS
                    or value.name in self.tensors
                    or value.name not in self.graph.initializers
                    or self._overridden_float(value)
                    or any(reader.op_type != "Add" for reader in value.consumers())
                ):
                    continue
                params = qparams.weight_qparams(
                    table, self.scheme.weight_dtype, axis=table.ndim - 2, symmetric=True
                )
                if float(np.max(params.scale)) > sum_step / TABLE_STEP_FRACTION:
                    continue
                self.tensors[value.name] = TensorDecision(
                    value.name,
                    Role.WEIGHT,
                    params,
                    f"table read by {node.name}, which stays float: stored as int8 per row",
                )

    def _readers_of_float_values(self) -> set[str]:
        """Float nodes whose quantized inputs all exist in float anyway: they read those.

        A tensor written by a float op (LayerNormalization, say) or given as a graph input
        is float at run time; a float reader of its dequantized copy would only take on
        its rounding, and run one DequantizeLinear more. A residual Add reading the
        LayerNormalization output it skips over is the case that matters: the copy
        would put the int8 error of that output into the residual stream.
        """
        folded = {fold.output for fold in self.folds}
        readers = set()
        for node in self.graph:
            decision = self.nodes.get(node.name or "")
            if decision is None or decision.quantized:
                continue
            planned = [
                value
                for value in node.inputs
                if value is not None
                and value.name in self.tensors
                and self.tensors[value.name].role is Role.ACTIVATION
            ]
            if planned and all(
                value.name not in folded and not self._written_quantized(value)
                for value in planned
            ):
                readers.add(node.name or "")
        return readers

    def _written_by_float_op(self, value: ir.Value) -> bool:
        """Whether a node already decided float writes `value`."""
        producer = value.producer()
        decision = self.nodes.get(producer.name or "") if producer is not None else None
        return decision is not None and not decision.quantized

    def _written_quantized(self, value: ir.Value) -> bool:
        """Whether an op running quantized writes `value` (so it exists only as integers)."""
        producer = value.producer()
        if producer is None:
            return False
        decision = self.nodes.get(producer.name or "")
        return decision is not None and decision.quantized

    def _mixed_range_add(self, add: ir.Node) -> str | None:
        """Why an Add of two activations of very different ranges stays float.

        An attention mask (-10000 where a token is padding) added to attention scores of
        order 10 is the common case: one output scale spans the mask, rounds the scores
        away, and the Softmax after it sees noise. `make bench` measured MiniLM's sentence
        embeddings at cosine 0.46 with such Adds quantized, 0.99 with them float.
        """
        if self._mixed_range(add) is None:
            return None
        return (
            "mixed-range Add: one input spans over "
            f"{MIXED_RANGE_RATIO:.0f}x the range of the other, so one scale would round "
            "the smaller away: stays float"
        )

    def _nodes(self) -> Iterator[ir.Node]:
        """The main graph's nodes, each If/Loop/Scan followed by the nodes of its bodies.

        Body nodes are planned like any other: calibration passes their tensors out of the
        holder (`calibration.subgraphs`), and the Q/DQ pairs go inside the body.
        """
        for node in self.graph:
            yield node
            if node.op_type in HOLDERS:
                yield from body_nodes(node)

    def _plan_subgraph_weights(self) -> None:
        """Says what happened inside each If/Loop/Scan; stores float body ops' weights int8.

        A body node calibration did not see (a body of a body, or a model calibrated
        before bodies were) stays float; its weights (main-graph initializers after
        preparation) are still stored as int8 and read through DequantizeLinear from the
        outer scope: the file shrinks, the arithmetic stays float.
        """
        for holder in self.graph:
            if holder.op_type not in HOLDERS or self._skip_reason(holder):
                continue
            inside = [node for node in subgraph_nodes(holder) if node.op_type not in HOLDERS]
            quantized = sum(
                1
                for node in inside
                if node.name in self.nodes and self.nodes[node.name].quantized
            )
            stored = 0
            for node in inside:
                rule = ops.quantized_rule(node)
                decided = self.nodes.get(node.name or "")
                if rule is None or (decided is not None and decided.quantized):
                    continue
                if self._skip_reason(node) is not None:
                    continue
                for index, axis_of in rule.weights.items():
                    value = node.inputs[index] if index < len(node.inputs) else None
                    weights = constant_array(value)
                    if (
                        weights is None
                        or weights.dtype != np.float32
                        or value.name not in self.graph.initializers
                        or value.name in self.tensors
                        or self._overridden_float(value)
                    ):
                        continue
                    self._plan_weight(node, value, axis_of, self.scheme)
                    stored += 1
            parts = [f"{quantized} of the {len(inside)} node(s) inside quantized"]
            if stored:
                parts.append(
                    f"{stored} weight(s) of float nodes inside stored as int8 (those "
                    "compute in float: calibration did not see their tensors)"
                )
            reason = f"holds subgraphs, and stays float itself: {'; '.join(parts)}"
            self._decide(holder, False, reason)
            if quantized or stored:
                self.notes.append(f"{holder.name}: {reason}.")

    def _decide(self, node: ir.Node, quantized: bool, reason: str) -> None:
        self.nodes[node.name or ""] = NodeDecision(
            node.name or "", node.op_type, quantized, reason
        )

    def _held_float_input(self, node: ir.Node) -> str | None:
        """The reason a node downstream of a mixed-range Concat stays float, if it is."""
        for value in node.inputs:
            if value is not None and value.name in self.held_float:
                return self.held_float[value.name]
        return None

    def _hold_float(self, node: ir.Node, reason: str) -> None:
        """Leaves `node` float, and everything that reads its outputs, for `reason`."""
        self._decide(node, False, reason)
        for output in node.outputs:
            self.held_float[output.name] = reason

    def _node_scheme(self, node: ir.Node) -> StaticScheme:
        """The run's scheme, or the one an override file sets for this node."""
        chosen = self.overrides.nodes.get(node.name or "")
        if chosen is None or chosen == self.scheme.name:
            return self.scheme
        preset = INT16X8 if chosen == INT16X8.name else INT8
        return preset.with_options(
            per_channel=self.scheme.per_channel,
            reduce_range=self.scheme.reduce_range and preset is INT8,
        )

    def _tensor_scheme(self, value: ir.Value) -> StaticScheme:
        """The widest scheme among the quantized nodes that write or read `value`.

        A tensor is quantized once, so a 16x8 node next to int8 ones gets int16 on both
        sides rather than an int8 input.
        """
        nodes = [value.producer(), *value.consumers()]
        schemes = [
            self._node_scheme(node)
            for node in nodes
            if node is not None
            and node.name not in self.nodes
            and self._skip_reason(node) is None
        ] or [self.scheme]
        return max(schemes, key=lambda s: (s.activation_dtype.itemsize, s is self.scheme))

    def _overridden_float(self, value: ir.Value | None) -> bool:
        return value is not None and self.overrides.tensors.get(value.name or "") == FLOAT

    def _refusal(self, node: ir.Node, rule: ops.QuantizedOpRule) -> str | None:
        """Why a node the table would quantize stays float, or None."""
        activations = activation_indices(node, rule)
        involved = [
            node.inputs[i] for i in (*activations, *rule.weights) if i < len(node.inputs)
        ]
        forced = next((v for v in involved if self._overridden_float(v)), None)
        if forced is not None:
            return f"its input '{forced.name}' is set to float by an override"
        if rule.output and not rule.weights and node.outputs[0].is_graph_output():
            return (
                "writes a graph output, and there is no integer kernel without a quantized "
                "output: stays float"
            )
        for index in rule.weights:
            value = node.inputs[index] if index < len(node.inputs) else None
            if (
                value is not None
                and constant_array(value) is None
                and self._uncalibrated(value)
            ):
                return _UNCALIBRATED.format(name=value.name)
        if rule.output and not rule.weights and self._feeds_mixed_concat(node.outputs[0]):
            return "feeds only a mixed-range Concat, which stays float: stays float"
        constants = [constant_array(node.inputs[i]) is not None for i in activations]
        if (activations and all(constants)) or (any(constants) and not rule.constant_operands):
            # All-constant arithmetic is folded by onnxruntime; quantizing it gains nothing.
            index = activations[constants.index(True)]
            return f"input {index} is a constant: stays float"
        for index, constant in zip(activations, constants, strict=True):
            value = node.inputs[index]
            if value.dtype is not None and value.dtype != ir.DataType.FLOAT:
                return f"input {index} is {value.dtype.name.lower()}, not float32: stays float"
            if not constant and self._uncalibrated(value):
                return _UNCALIBRATED.format(name=value.name)
            seen = self.ranges.get(value.name)
            if not constant and seen is not None and seen.min == seen.max == 0.0:
                # No scale fits a tensor never seen non-zero, and the bias would be stored
                # at an arbitrary one; the node is cheap to leave alone.
                return f"input {index} is zero on every sample: stays float"
        return None

    def _chain_refusal(self, node: ir.Node, rule: ops.QuantizedOpRule) -> str | None:
        """Why an op without weights gains nothing from running quantized here, or None."""
        if not rule.weights and not any(
            self.tensors.get(node.inputs[i].name, None) is not None
            and self.tensors[node.inputs[i].name].role is Role.ACTIVATION
            for i in activation_indices(node, rule)
        ):
            # No quantized value flows in: Q/DQ pairs on every input would cost more than
            # the integer kernel saves.
            return "no quantized input flows into it: stays float"
        if node.op_type == "Add" and any(
            constant_array(value) is None
            and value.name not in self.tensors
            and self._written_by_float_op(value)
            for value in node.inputs
        ):
            # An attention mask computed in float from the inputs, say: a Q of its own
            # would round the mask and the scores onto one grid.
            return "an input comes from a float op: stays float"
        if not rule.weights and rule.output and not self._feeds_quantized(node.outputs[0]):
            # Its output would be dequantized at once for a float reader: no integer chain.
            return "only float ops read its output: stays float"
        if not rule.weights and self._feeds_only_answer(node.outputs[0]):
            return _FEEDS_ANSWER
        return None

    def _feeds_quantized(self, value: ir.Value) -> bool:
        """Whether an op that may run quantized reads `value` (looking through Relu/Clip).

        Ops left float (a GELU's, a mixed-range Add) do not count, and an Add counts only
        when its sum feeds such an op in turn, as it runs quantized only then. So the
        residual Adds of a transformer, whose sums reach only LayerNormalization, stay
        float, and so does the branch output they add: the residual stream keeps full
        precision, the int8 error of each block is not carried into every later one, and
        onnxruntime fuses bias, residual Add and LayerNormalization into one
        SkipLayerNormalization.
        """
        if value.name in self.feeds_quantized:
            return self.feeds_quantized[value.name]
        answer = False
        for node in value.consumers():
            rule = ops.quantized_rule(node)
            if node.op_type in ops.CLAMPS:
                answer = self._feeds_quantized(node.outputs[0])
            elif node.op_type in ops.PASS_THROUGH or (rule is not None and rule.weights):
                answer = True
            elif rule is None or node.name in self.gelu or self._skip_reason(node):
                answer = False
            elif node.op_type == "Add":
                answer = self._feeds_quantized(node.outputs[0])
            else:
                answer = True
            if answer:
                break
        self.feeds_quantized[value.name] = answer
        return answer

    def _fold_scale(self, mul: ir.Node) -> bool:
        """Drops a Mul of a quantized tensor by a positive constant scalar into its scale.

        (x_q - z) * s * c is the product exactly, so the Mul needs neither a kernel nor a
        rounding: attention's scores / sqrt(d) are the case. Float readers read the same
        values as before (the Mul read the dequantized input), except a float Conv/Gemm,
        which is made to read the float tensor behind a DequantizeLinear: it keeps the Mul.
        """
        output = mul.outputs[0]
        if (
            mul.op_type != "Mul"
            or len(mul.inputs) != 2
            or output.is_graph_output()
            or output.name in self.tensors
            or self._overridden_float(output)
            or self.overrides.tensor_dtype(output.name or "") is not None
            or any(reader.op_type in ops.REQUANTIZED_OPS for reader in output.consumers())
        ):
            return False
        for source, constant in (mul.inputs, reversed(mul.inputs)):
            factor = constant_array(constant)
            decision = self.tensors.get(source.name) if source is not None else None
            if factor is None or factor.size != 1 or decision is None:
                continue
            value = float(factor.reshape(()))
            if decision.role is not Role.ACTIVATION or not 0.0 < value < float("inf"):
                continue
            scaled = (decision.qparams.scale * np.float32(value)).astype(np.float32)
            self.tensors[output.name] = TensorDecision(
                output.name,
                Role.ACTIVATION,
                replace(decision.qparams, scale=scaled),
                f"{source.name} x {value:g}, read at the scale of {source.name} x {value:g}",
            )
            self.scale_folds.append(ScaleFold(mul.name or "", source.name, output.name))
            self._decide(mul, True, f"folded into the scale of {source.name}")
            return True
        return False

    def _feeds_only_answer(self, value: ir.Value) -> bool:
        """Whether `value` reaches only last weighted layers, through ops without weights.

        Those layers read their input in float (`_plan_answer`), so the ops on the way
        (the global pooling and reshape before a classifier) compute the same feature in
        float: it is small, and it is the tensor whose range grows with the evidence, so a
        calibrated range would clip it on data unlike the calibration set.
        """
        if value.name in self.feeds_answer:
            return self.feeds_answer[value.name]
        self.feeds_answer[value.name] = False  # a cycle-safe default while deciding
        consumers = value.consumers()
        answer = bool(consumers) and not value.is_graph_output()
        for reader in consumers:
            if not answer:
                break
            rule = ops.quantized_rule(reader)
            if reader.op_type in _SHAPE_READERS:
                continue  # reads the shape, not the values
            if rule is not None and rule.weights:
                answer = self._model_answer(reader)
            elif rule is not None or reader.op_type in ops.PASS_THROUGH:
                answer = bool(reader.outputs) and all(
                    self._feeds_only_answer(out) for out in reader.outputs
                )
            else:
                answer = False
        self.feeds_answer[value.name] = answer
        return answer

    def _plan_quantized(self, node: ir.Node, rule: ops.QuantizedOpRule) -> None:
        if self._fold_scale(node):
            return
        if node.name in self.mixed:
            self._hold_float(node, self.mixed[node.name])
            self.notes.append(f"{node.name}: {self.mixed[node.name]}")
            return
        refusal = self._refusal(node, rule) or self._chain_refusal(node, rule)
        if refusal is not None:
            self._decide(node, False, refusal)
            if rule.weights:
                self.float_readers.add(node.name or "")
            return
        scheme = self._node_scheme(node)
        if self._model_answer(node):
            self._plan_stored_weights(node, rule, scheme, ANSWER_REASON)
            return
        if self._thin_conv_island(node):
            self._plan_stored_weights(node, rule, scheme, THIN_ISLAND_REASON)
            return
        for index in activation_indices(node, rule):
            value = node.inputs[index]
            if constant_array(value) is not None:
                self._plan_constant_operand(node, value)
            else:
                self._plan_activation(value, f"input of {node.name}")
        weight_params: dict[int, qparams.QParams] = {}
        for index, axis_of in rule.weights.items():
            value = node.inputs[index] if index < len(node.inputs) else None
            if value is None:
                continue
            if constant_array(value) is None:
                self._plan_activation(value, f"input of {node.name}")
            else:
                weight_params[index] = self._plan_weight(node, value, axis_of, scheme)
        if rule.bias is not None:
            self._plan_bias(node, rule.bias, weight_params)
        bias_add = self._bias_add(node) if weight_params else None
        if bias_add is not None:
            # The Add's output is the layer's output; the MatMul's own is never materialized:
            # onnxruntime runs the pair as one QGemm, with or without a quantized output.
            self._decide(bias_add, True, f"adds the bias of {node.name}: one layer with it")
            if self._feeds_quantized(bias_add.outputs[0]):
                self._plan_output(bias_add)
            if bias_add.outputs[0].name not in self.tensors:
                bias = next(v for v in bias_add.inputs if v is not node.outputs[0])
                self._plan_int32_bias(
                    node, bias, node.inputs[0], node.inputs[1], weight_params.get(1)
                )
        elif rule.output:
            self._plan_output(node)
        label = "quantized" if scheme is self.scheme else f"quantized as {scheme.name}"
        self._decide(node, True, label)

    def _bias_add(self, matmul: ir.Node) -> ir.Node | None:
        """The Add that adds a bias to a MatMul's output, when the pair is one linear layer.

        MatMul(x, W) + b with a constant 1-D b of W's output width, and the Add the only
        reader, is a Gemm written in two nodes (as exporters write Linear layers on 3-D
        inputs). Quantizing the MatMul's output and then the Add's stores b as 8 bits
        with one scale per tensor, an error each token carries the same way, and rounds
        twice. onnxruntime fuses the pair into one QGemm instead:

        1. when the layer's output is quantized, DQ -> MatMul -> Add -> Q with b left
           float: QGemm quantizes b to int32 at scale input x weight itself, and b costs
           4 bytes an element (int32 here would need a float scale vector beside it);
        2. when only float ops read it (a residual Add), b is stored int32 at that scale,
           as a Gemm's: QGemm then writes float. With a float b onnxruntime would run a
           float Gemm on weights dequantized at every run.
        """
        if matmul.op_type != "MatMul" or self.format != "qdq":
            return None
        output = matmul.outputs[0]
        consumers = output.consumers()
        if output.is_graph_output() or len(consumers) != 1 or consumers[0].op_type != "Add":
            return None
        add = consumers[0]
        if add.name in self.nodes or self._skip_reason(add) is not None:
            return None
        other = add.inputs[1] if add.inputs[0] is output else add.inputs[0]
        bias, weight = constant_array(other), constant_array(matmul.inputs[1])
        if (
            bias is None
            or weight is None
            or bias.dtype != np.float32
            or bias.shape != (weight.shape[-1],)
            or self._overridden_float(add.outputs[0])
        ):
            return None
        return add

    def _plan_stored_weights(
        self, node: ir.Node, rule: ops.QuantizedOpRule, scheme: StaticScheme, reason: str
    ) -> None:
        """A layer that computes in float, its weights stored as int8: float input, output."""
        count = 0
        for index, axis_of in rule.weights.items():
            value = node.inputs[index] if index < len(node.inputs) else None
            if constant_array(value) is not None and not self._overridden_float(value):
                self._plan_weight(node, value, axis_of, scheme)
                count += 1
        self.float_readers.add(node.name or "")
        self._decide(node, False, reason + (" from int8-stored weights" if count else ""))

    def _thin_conv_island(self, node: ir.Node) -> bool:
        """Whether `node` is a thin Conv between float ops, which computes faster in float.

        Quantized there, it would run as an int8 island: a QuantizeLinear of its float
        input, onnxruntime's integer kernel (NHWC, so a Transpose on each side of it) and a
        DequantizeLinear for its float readers. A Conv reading few channels per output
        (THIN_CONV_MAX_CHANNELS: depthwise, or a first layer on three colour channels)
        does too little arithmetic to pay for that: measured one onnxruntime thread, such
        islands ran 1.9x (3x3 depthwise, 32 channels) to 2.9x (5x5 depthwise, 88 channels)
        and 2.2x (3x3 on 3 channels) slower than the float Conv, while islands of 32 input
        channels and more ran faster in int8. PP-OCR's MobileNetV3 classifier, whose 5x5
        depthwise Convs sit between HardSwish activations, runs in 0.65x of the time with
        them float. Inside an int8 chain the same Convs stay quantized: there the island
        costs are not paid.
        """
        if node.op_type != "Conv" or not node.inputs or not node.outputs:
            return False
        weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if weight is None or weight.ndim < 3 or weight.shape[1] > THIN_CONV_MAX_CHANNELS:
            return False
        source, output = node.inputs[0], node.outputs[0]
        if (
            source is None
            or source.name in self.tensors
            or self._written_quantized(source)
            # An override file that names the node or its tensors decides for itself.
            or (node.name or "") in self.overrides.nodes
            or source.name in self.overrides.tensors
            or output.name in self.overrides.tensors
        ):
            return False
        readers = output.consumers()
        return (
            bool(readers)
            and not output.is_graph_output()
            and not self._feeds_quantized(output)
        )

    def _model_answer(self, node: ir.Node) -> bool:
        """Whether `node` is a classifier head.

        That is a last weighted layer (its output reaches graph outputs through ops
        without weights only: Add, Softmax, Reshape) that reads a globally pooled feature
        (GlobalAveragePool, through Reshape/Flatten/Squeeze).

        Such a head computes in float from int8-stored weights (`_plan_answer`) when it is
        small (HEAD_FLOAT_MAX_WEIGHTS). Its input and output have no spatial extent (C and
        K values a sample), so float costs nothing measurable, while both are the tensors
        most exposed to data unlike the calibration set: a mean over the whole image grows
        with the evidence in it, and logits grow with the model's confidence (clipped, two
        classes saturate to a tie).
        On PP-OCR's orientation classifier, calibrated on rendered lines and evaluated on
        a scanned page, the pooled features reach 1.9x and the logits 6x their calibrated
        range; keeping them float raised top-1 agreement from 87.5 % to 92.2 %.
        """
        rule = ops.quantized_rule(node)
        if rule is None or not rule.weights or not node.outputs or not node.inputs:
            return False
        if not globally_pooled(node.inputs[0]):
            return False
        arrays = [constant_array(node.inputs[i]) for i in rule.weights if i < len(node.inputs)]
        size = sum(array.size for array in arrays if array is not None)
        return size <= HEAD_FLOAT_MAX_WEIGHTS and self._reaches_outputs_unweighted(
            node.outputs[0]
        )

    def _reaches_outputs_unweighted(self, value: ir.Value) -> bool:
        if value.name in self.answer_values:
            return self.answer_values[value.name]
        self.answer_values[value.name] = False  # a cycle-safe default while deciding
        consumers = value.consumers()
        answer = value.is_graph_output() or bool(consumers)
        for reader in consumers:
            rule = ops.quantized_rule(reader)
            weighted = rule is not None and any(
                i < len(reader.inputs)
                and reader.inputs[i] is not None
                and reader.inputs[i] is not value
                and constant_array(reader.inputs[i]) is not None
                for i in rule.weights
            )
            if weighted or reader.op_type in HOLDERS:
                answer = False
            else:
                answer = answer and all(
                    self._reaches_outputs_unweighted(out) for out in reader.outputs
                )
            if not answer:
                break
        self.answer_values[value.name] = answer
        return answer

    def _uncalibrated(self, value: ir.Value) -> bool:
        """A tensor calibration never saw: one the opset upgrade added, say."""
        return value.name not in self.ranges and value.name not in self.tensors

    def _feeds_mixed_concat(self, value: ir.Value) -> bool:
        """Whether `value` only reaches mixed-range Concats, which read float.

        Directly, or through ops with no weights (Sigmoid, Mul, ...) that then stay float
        too: quantizing the tensors on the way would only add rounding to the small input.
        """
        if value.name in self.feeds_mixed:
            return self.feeds_mixed[value.name]
        self.feeds_mixed[value.name] = False  # a cycle-safe default while deciding
        consumers = value.consumers()
        answer = bool(consumers) and not value.is_graph_output()
        for node in consumers:
            if not answer:
                break
            if node.name in self.mixed:
                continue
            rule = ops.quantized_rule(node)
            answer = (
                rule is not None
                and not rule.weights
                and len(node.outputs) == 1
                and self._feeds_mixed_concat(node.outputs[0])
            )
        self.feeds_mixed[value.name] = answer
        return answer

    def _mixed_range(self, concat: ir.Node) -> str | None:
        """Why a Concat's inputs cannot share one scale, or None when they can.

        One scale serves the concatenated tensor; when one input spans 100 times the range
        of another (box coordinates in pixels beside class scores in 0..1), that scale
        rounds the small input to a few levels, or to zero.
        """
        widths = {}
        for value in concat.inputs:
            seen = self.ranges.get(value.name) if value is not None else None
            if seen is not None:
                widths[value.name] = max(abs(seen.min), abs(seen.max))
        if len(widths) < 2 or min(widths.values()) <= 0.0:
            return None
        widest = max(widths, key=widths.__getitem__)
        narrowest = min(widths, key=widths.__getitem__)
        ratio = widths[widest] / widths[narrowest]
        if ratio <= MIXED_RANGE_RATIO:
            return None
        return (
            f"mixed-range Concat: input '{widest}' spans {ratio:.0f}x the range of "
            f"'{narrowest}', so one scale would round the latter away; it and what follows "
            "stay float"
        )

    def _shared_concat_params(self, value: ir.Value) -> tuple[str, qparams.QParams] | None:
        """The parameters of the Concat that reads `value`, when `value` should share them.

        Inputs quantized with the Concat output's parameters make the concatenation a copy
        of integers (no rescale). That holds when `value`'s only reader is that Concat and
        the Concat is quantized with ranges of comparable size.
        """
        consumers = value.consumers()
        if len(consumers) != 1 or consumers[0].op_type != "Concat":
            return None
        concat = consumers[0]
        output = concat.outputs[0]
        if (
            self._skip_reason(concat) is not None
            or self._refusal(concat, ops.QUANTIZED["Concat"]) is not None
            or concat.name in self.mixed
            or any(v is not None and v.name in self.held_float for v in concat.inputs)
            or self._overridden_float(output)
            or self.overrides.tensor_dtype(value.name or "") is not None
            or output.name not in self.ranges
        ):
            return None
        return concat.name or "", self._activation_params(output, output.name)

    def _plan_constant_operand(self, node: ir.Node, value: ir.Value) -> None:
        """A constant operand of Add/Mul/Concat, stored as integers of the activation type."""
        if value.name in self.tensors:
            return
        array = constant_array(value).astype(np.float64)
        scheme = self._tensor_scheme(value)
        params = qparams.range_qparams(
            float(array.min(initial=0.0)),
            float(array.max(initial=0.0)),
            scheme.activation_dtype,
            symmetric=scheme.activation_symmetric or scheme.activation_dtype.itemsize == 2,
        )
        self.tensors[value.name] = TensorDecision(
            value.name,
            Role.WEIGHT,
            params,
            f"constant operand of {node.name}, per tensor in the activation type",
        )

    def _plan_pass_through(self, node: ir.Node) -> None:
        source = node.inputs[0] if node.inputs else None
        decision = self.tensors.get(source.name) if source is not None else None
        if decision is None or decision.role is not Role.ACTIVATION:
            self._decide(node, False, "its input is float: stays float")
            return
        if any(o.is_graph_output() or self._overridden_float(o) for o in node.outputs):
            self._decide(node, False, "writes a float output: stays float")
            return
        if all(self._feeds_only_answer(o) for o in node.outputs):
            self._decide(node, False, _FEEDS_ANSWER)
            return
        for output in node.outputs:
            self.tensors[output.name] = TensorDecision(
                output.name,
                Role.ACTIVATION,
                decision.qparams,
                f"shares the parameters of {source.name}",
            )
        self._decide(node, True, "passes quantized values through")

    def _plan_activation(self, value: ir.Value | None, reason: str) -> qparams.QParams | None:
        if value is None:
            return None
        if value.name in self.tensors:
            return self.tensors[value.name].qparams
        shared = self._shared_concat_params(value)
        if shared is not None:
            concat, params = shared
            reason = f"{reason}, shares the parameters of {concat}'s output"
        else:
            params = self._activation_params(value, value.name)
        self.tensors[value.name] = TensorDecision(value.name, Role.ACTIVATION, params, reason)
        return params

    def _activation_params(
        self,
        value: ir.Value,
        stats_name: str,
        *,
        bounds: tuple[float, float] | None = None,
    ) -> qparams.QParams:
        """Parameters from the calibrated range, widened to `bounds` where that fits.

        `bounds` is the fixed output range of the op that writes the tensor; the range is
        widened to it when calibration covered enough of it.
        """
        tensor_range = self.ranges.get(stats_name)
        if tensor_range is None:
            raise CalibrationDataError(
                f"The calibration has no range for tensor '{stats_name}'.",
                hint="calibrate again with this model.",
            )
        if bounds is not None:
            tensor_range = _widened_to_bounds(tensor_range, bounds)
        scheme = self._tensor_scheme(value)
        dtype = self.overrides.tensor_dtype(value.name or "") or scheme.activation_dtype
        return qparams.range_qparams(
            tensor_range.min,
            tensor_range.max,
            dtype,
            # 16-bit activations are symmetric, as TensorFlow Lite's 16x8 defines them.
            symmetric=scheme.activation_symmetric or dtype.itemsize == 2,
        )

    def _plan_weight(
        self, node: ir.Node, value: ir.Value, axis_of, scheme: StaticScheme
    ) -> qparams.QParams:
        existing = self.tensors.get(value.name)
        if existing is not None:
            return existing.qparams
        weights = constant_array(value)
        axis = axis_of(node, weights.ndim) if scheme.per_channel and weights.ndim > 1 else None
        params = qparams.weight_qparams(
            weights,
            self.overrides.tensor_dtype(value.name or "") or scheme.weight_dtype,
            axis=axis,
            symmetric=True,
            reduce_range=scheme.reduce_range,
        )
        granularity = "per channel" if axis is not None else "per tensor"
        self.tensors[value.name] = TensorDecision(
            value.name, Role.WEIGHT, params, f"weight of {node.name}, {granularity}"
        )
        return params

    def _plan_bias(
        self,
        node: ir.Node,
        indices: tuple[int, int, int],
        weight_params: dict[int, qparams.QParams],
    ) -> None:
        bias_index, input_index, weight_index = indices
        if bias_index >= len(node.inputs) or node.inputs[bias_index] is None:
            return
        if node.op_type == "Gemm" and node.attributes.get_float("beta", 1.0) != 1.0:
            return  # a bias the integer kernels cannot add as is stays float
        self._plan_int32_bias(
            node,
            node.inputs[bias_index],
            node.inputs[input_index],
            node.inputs[weight_index],
            weight_params.get(weight_index),
        )

    def _plan_int32_bias(
        self,
        node: ir.Node,
        bias: ir.Value,
        input_value: ir.Value,
        weight_value: ir.Value,
        weight: qparams.QParams | None,
    ) -> None:
        """Plans `bias` as int32 at scale input scale x weight scale."""
        if bias.name in self.tensors or weight is None or constant_array(bias) is None:
            return
        if self._overridden_float(bias):
            return
        if constant_array(bias).ndim != 1:
            return  # a bias the integer kernels cannot add as is stays float
        input_params = self.tensors[input_value.name].qparams
        weight_name = weight_value.name
        fitted = qparams.fit_weight_scale_to_bias(
            weight,
            constant_array(weight_value),
            input_params.scale,
            constant_array(bias),
        )
        if fitted is not weight:
            decision = self.tensors[weight_name]
            self.tensors[weight_name] = replace(
                decision,
                qparams=fitted,
                reason=f"{decision.reason}, scale set so the int32 bias is exact",
            )
            weight = fitted
        params = qparams.bias_qparams(input_params.scale, weight.scale)
        self.tensors[bias.name] = TensorDecision(
            bias.name,
            Role.BIAS,
            params,
            f"bias of {node.name}, int32",
            scale_product_of=(input_value.name, weight_name),
        )

    def _plan_output(self, node: ir.Node) -> None:
        output = node.outputs[0]
        if (
            output.is_graph_output()
            or output.name in self.tensors
            or self._overridden_float(output)
            or self._feeds_mixed_concat(output)
            or self._model_answer(node)
        ):
            return
        # A tensor calibration never saw (a Conv output that preparation rescaled, as when
        # it folds a HardSigmoid) can still be quantized through the clamp after it, whose
        # output calibration did see; otherwise it is left float.
        calibrated = output.name in self.ranges
        shared = self._shared_concat_params(output) if calibrated else None
        if shared is not None:
            concat, params = shared
            self.tensors[output.name] = TensorDecision(
                output.name,
                Role.ACTIVATION,
                params,
                f"output of {node.name}, shares the parameters of {concat}'s output",
            )
            return
        chain = clamp_chain(output)
        # The longest run of clamps that quantization can absorb wins: Relu then Clip(0, 6)
        # is quantized with the Clip's output range, not the Relu's wider one. An excluded
        # clamp stays a node of its own, so the run stops before it.
        for position, clamp in enumerate(chain):
            if self._skip_reason(clamp) is not None or self._overridden_float(
                clamp.outputs[0]
            ):
                chain = chain[:position]
                break
        for length in range(len(chain), 0, -1):
            clamps = chain[:length]
            clamped = clamps[-1].outputs[0]
            if clamped.name not in self.ranges:
                continue
            bounds = combined_bounds(clamps)
            params = self._activation_params(clamped, clamped.name, bounds=bounds)
            if not clamp_is_exact(params, bounds):
                continue
            names = tuple(clamp.name or "" for clamp in clamps)
            self.tensors[clamped.name] = TensorDecision(
                clamped.name,
                Role.ACTIVATION,
                params,
                f"output of {node.name}, absorbs {', '.join(names)}",
            )
            self.folds.append(ClampFold(names, output.name, clamped.name))
            for clamp in clamps:
                self._decide(clamp, True, f"folded into the quantization of {node.name}")
            return
        if not calibrated:
            return
        bounds = _BOUNDED_OUTPUTS.get(node.op_type)
        params = self._activation_params(output, output.name, bounds=bounds)
        self.tensors[output.name] = TensorDecision(
            output.name, Role.ACTIVATION, params, f"output of {node.name}"
        )


ANSWER_REASON = (
    "last weighted layer (its output reaches the model's outputs through ops without "
    "weights): computes in float"
)

THIN_ISLAND_REASON = (
    "thin Conv between float ops (few input channels per output): int8 would cost more in "
    "QuantizeLinear, DequantizeLinear and layout changes than it saves: computes in float"
)

GELU_REASON = (
    "part of a GELU written out as x * (1 + erf(x / sqrt 2)) / 2: stays float, as one "
    "activation (rounding inside it costs transformers their accuracy)"
)


def _widened_to_bounds(seen: TensorRange, bounds: tuple[float, float]) -> TensorRange:
    """`seen`, or the op's output `bounds` when it covers BOUND_COVERAGE of them."""
    low, high = bounds
    if not (np.isfinite(low) and np.isfinite(high)) or high <= low:
        return seen
    # The integer grid always holds zero, so what widening costs is the ratio of the grids.
    covered = min(max(seen.max, 0.0), high) - max(min(seen.min, 0.0), low)
    if covered < BOUND_COVERAGE * (high - low):
        return seen
    return TensorRange(min=low, max=high)
