"""Planning the static schemes (int8, 16x8): the driver.

The planner walks the graph once in topological order (each If/Loop/Scan followed by the
nodes of its bodies) and reads the op policy table (`ops.py`), the scheme and the
calibrated ranges. This module decides, node by node, which rule family plans it; the
families are mixins, one module each: `weights` (weights, biases), `activations`
(activations, outputs, clamp and scale folds), `concat` (Concat, pass-through, mixed
ranges), `answer_head` (a classifier's head), `float_islands` (other layers that compute in
float), `vectors` and `moves`. The graph patterns they look for (GELU, Relu/Clip chains,
global pooling) are pure functions in `patterns`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import onnx_ir as ir

from qconvert import ops, qparams
from qconvert.calibration import TensorRange
from qconvert.calibration.observers import TensorObserver
from qconvert.graph_utils import constant_array
from qconvert.overrides import Overrides
from qconvert.plan.activations import ActivationRules
from qconvert.plan.answer_head import ANSWER_REASON, FEEDS_ANSWER_REASON, AnswerHeadRules
from qconvert.plan.common import check_overrides, skip_reason
from qconvert.plan.concat import ConcatRules
from qconvert.plan.decisions import (
    QuantPlan,
    Role,
)
from qconvert.plan.float_islands import (
    FLOAT_READERS_REASON,
    ISLAND_LAYER_REASON,
    STEM_REASON,
    THIN_ISLAND_REASON,
    WIDENING_REASON,
    FloatIslandRules,
)
from qconvert.plan.moves import MovedInputRules
from qconvert.plan.patterns import (
    activation_indices,
    gelu_nodes,
)
from qconvert.plan.vectors import VECTOR_REASON, VectorLayerRules
from qconvert.plan.weights import WeightRules
from qconvert.schemes import StaticScheme
from qconvert.selection import NodeSelection

_UNCALIBRATED = (
    "calibration has no range for its input '{name}' (a tensor the opset upgrade added, or "
    "a calibration of another model): stays float"
)


def make_plan(
    model: ir.Model,
    scheme: StaticScheme,
    ranges: Mapping[str, TensorRange],
    *,
    excluded: frozenset[str] = frozenset(),
    raised: frozenset[str] = frozenset(),
    selection: NodeSelection | None = None,
    overrides: Overrides | None = None,
    format: str = "qdq",
    histograms: Mapping[str, TensorObserver] | None = None,
) -> QuantPlan:
    """Plans the static quantization of `model` with `scheme` and calibrated `ranges`.

    Nodes named in `excluded`, or left float by `selection` or `overrides`, stay float;
    their neighbours still quantize the tensors they share with them. Nodes named in
    `raised` (the recipe's) compute in float too, their weights stored as int8
    (`RAISED_REASON`). `format` is how
    the plan will be written (qdq or qop): a MatMul and the Add of its bias make one
    layer only in QDQ, where onnxruntime fuses them into QGemm. `histograms` (the
    calibration's statistics) let a tensor only a SiLU reads drop the tail SiLU flattens
    (`plan.silu`); without them every range is the calibrated one.
    """
    overrides = overrides or Overrides()
    check_overrides(model, overrides, static=True, scheme=scheme.name)
    selection = selection or NodeSelection()
    planner = _Planner(
        model,
        scheme,
        ranges,
        excluded,
        selection,
        overrides,
        format,
        raised=raised,
        histograms=histograms,
    )
    return planner.run()


class _Planner(
    ConcatRules,
    AnswerHeadRules,
    FloatIslandRules,
    VectorLayerRules,
    MovedInputRules,
    ActivationRules,
    WeightRules,
):
    """Plans one model: picks, for each node, the rule family that decides it."""

    def run(self) -> QuantPlan:
        self.gelu = gelu_nodes(self.graph)
        self.mixed = {
            node.name: reason
            for node in self._nodes()
            if node.op_type == "Concat" and (reason := self._mixed_range(node)) is not None
        }
        self.held_clamps = self._held_clamps()
        self.feeds_quantized.clear()  # decided again, with the clamps' readers float
        for node in self._nodes():
            if node.name in self.nodes:
                continue  # a clamp already folded into its producer
            skip = self._skip_reason(node)
            rule = ops.quantized_rule(node)
            # A node left float reads the float tensors, unless it can read them dequantized.
            if node.name in self.mixed or (
                skip is not None and not self._reads_dequantized(node)
            ):
                self.float_readers.add(node.name or "")
            if skip is not None and node.name in self.raised and rule and rule.weights:
                self._plan_stored_weights(node, rule, self._node_scheme(node), skip)
                if self._reads_dequantized(node):  # as any node left float, above
                    self.float_readers.discard(node.name or "")
            elif skip is not None:
                self._decide(node, False, skip)
            elif (held := self._held_float_input(node)) is not None:
                self._hold_float(node, held)
            elif node.name in self.gelu:
                self._decide(node, False, GELU_REASON)
            elif (reason := self._excluded_clamp_reader(node)) is not None:
                self._plan_excluded_clamp_reader(node, rule, reason)
            elif rule is not None:
                self._plan_quantized(node, rule)
            elif node.op_type in ops.PASS_THROUGH:
                self._plan_pass_through(node)
            else:
                self._decide(node, False, ops.float_reason(node))
        self._plan_subgraph_weights()
        self._plan_tables_of_float_adds()
        self._plan_weights_of_float_ops()
        self.float_readers.update(self._readers_of_float_values())
        # onnxruntime quantizes the float weights of any Conv, ConvTranspose or Gemm whose
        # first input comes from a DequantizeLinear (its WeightBiasQuantization step): a
        # float one reads the float tensor, or it would run quantized after all.
        self.float_readers.update(
            decision.name
            for decision in self.nodes.values()
            if not decision.quantized
            and decision.op_type in ops.REQUANTIZED_OPS
            and decision.name not in self.reads_dequantized
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

    def _plan_excluded_clamp_reader(
        self, node: ir.Node, rule: ops.QuantizedOpRule | None, reason: str
    ) -> None:
        """Plans a reader of an excluded clamp's output float, reading the float tensor."""
        if rule is not None and rule.weights:
            self._plan_stored_weights(node, rule, self._node_scheme(node), reason)
        else:
            self.float_readers.add(node.name or "")
            self._decide(node, False, reason)

    def _skip_reason(self, node: ir.Node) -> str | None:
        if node.name in self.raised:
            return RAISED_REASON
        reason = skip_reason(node, self.selection, self.overrides, self.excluded)
        if reason is None and node.op_type == "Add":
            reason = self._mixed_range_add(node)
        return reason

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
        if self._integer_pooled_head(node):
            self._plan_pooled_head(node)
            return
        if self._model_answer(node):
            self._plan_stored_weights(node, rule, scheme, ANSWER_REASON)
            return
        if self._float_island_layer(node, rule):
            reason = ISLAND_LAYER_REASON.format(op=node.op_type)
            if node.inputs and node.inputs[0] is not None:
                self._plan_float_layer(node, rule, scheme, reason)
            else:
                self._plan_stored_weights(node, rule, scheme, reason)
            return
        if self._thin_conv_island(node):
            self._plan_stored_weights(node, rule, scheme, THIN_ISLAND_REASON)
            return
        if self._float_vector_layer(node, rule):
            self._plan_stored_weights(node, rule, scheme, VECTOR_REASON)
            return
        if self._float_readers_only(node, rule):
            self._plan_float_layer(node, rule, scheme)
            return
        if self._float_widening_conv(node):
            self._plan_float_layer(node, rule, scheme, WIDENING_REASON)
            return
        if self._float_stem_conv(node):
            self._plan_stored_weights(node, rule, scheme, STEM_REASON)
            return
        for index in activation_indices(node, rule):
            value = node.inputs[index]
            if constant_array(value) is not None:
                self._plan_constant_operand(node, value)
            else:
                self._plan_moved_activation(value, f"input of {node.name}")
        weight_params: dict[int, qparams.QParams] = {}
        for index, axis_of in rule.weights.items():
            value = node.inputs[index] if index < len(node.inputs) else None
            if value is None:
                continue
            if constant_array(value) is None:
                self._plan_moved_activation(value, f"input of {node.name}")
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
        elif rule.output and not self._writes_float(node, weight_params):
            self._plan_output(node)
        label = "quantized" if scheme is self.scheme else f"quantized as {scheme.name}"
        self._decide(node, True, label)

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
        if self._integer_pooled_head(node):
            return None
        if not rule.weights and rule.output and not self._feeds_quantized(node.outputs[0]):
            # Its output would be dequantized at once for a float reader: no integer chain.
            return "only float ops read its output: stays float"
        if not rule.weights and self._feeds_only_answer(node.outputs[0]):
            return FEEDS_ANSWER_REASON
        if not rule.weights and rule.output and self._read_in_float(node.outputs[0]):
            return FLOAT_READERS_REASON
        return None


RAISED_REASON = "raised by the recipe: computes in float"
"""With `_plan_stored_weights`' suffix: its weights stay int8 in the file, dequantized when
the model loads, so a raise costs float work, not file bytes."""

GELU_REASON = (
    "part of a GELU written out as x * (1 + erf(x / sqrt 2)) / 2: stays float, as one "
    "activation (rounding inside it costs transformers their accuracy)"
)
