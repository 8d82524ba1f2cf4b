"""Planning: decide, per tensor, how it is quantized, as plain immutable data.

The planner walks the graph once in topological order and reads the op policy table
(`ops.py`), the scheme and the calibrated ranges. It returns a `QuantPlan`:

1. every activation to quantize, with its parameters (from its calibrated range);
2. every weight, with its per-channel axis and parameters (from its values);
3. every bias, as int32 at scale activation scale x weight scale;
4. every Relu/Clip whose clamp the output quantization already performs, to drop;
5. every node, quantized or float, with the reason.

The rewrite pass only applies the plan, and the report shows it, so a user can see why
each node is or is not quantized.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import Enum
from types import MappingProxyType

import numpy as np
import onnx_ir as ir

from qconvert import ops, qparams
from qconvert.calibration import TensorRange
from qconvert.errors import CalibrationDataError
from qconvert.graph_utils import constant_array
from qconvert.schemes import StaticScheme


class Role(str, Enum):
    """What a quantized tensor is to the node that reads it."""

    ACTIVATION = "activation"
    WEIGHT = "weight"
    BIAS = "bias"


@dataclass(frozen=True, slots=True)
class TensorDecision:
    """How one tensor is quantized, and why."""

    name: str
    role: Role
    qparams: qparams.QParams
    reason: str


@dataclass(frozen=True, slots=True)
class NodeDecision:
    """Whether one node runs quantized, and why."""

    name: str
    op_type: str
    quantized: bool
    reason: str


@dataclass(frozen=True, slots=True)
class ClampFold:
    """Relu/Clip nodes dropped because quantizing `source` with the parameters of `output`
    (the last clamp's output) already clamps as they do."""

    nodes: tuple[str, ...]
    source: str
    output: str


@dataclass(frozen=True, slots=True)
class QuantPlan:
    """The decisions for a whole model; the rewrite passes only apply them."""

    scheme: StaticScheme
    tensors: Mapping[str, TensorDecision]
    nodes: tuple[NodeDecision, ...]
    folds: tuple[ClampFold, ...]

    def quantized_nodes(self) -> tuple[NodeDecision, ...]:
        """The nodes that run on quantized inputs."""
        return tuple(node for node in self.nodes if node.quantized)

    def float_nodes(self) -> tuple[NodeDecision, ...]:
        """The nodes left in float, each with the reason."""
        return tuple(node for node in self.nodes if not node.quantized)


def make_plan(
    model: ir.Model,
    scheme: StaticScheme,
    ranges: Mapping[str, TensorRange],
    *,
    excluded: frozenset[str] = frozenset(),
) -> QuantPlan:
    """Plans the static quantization of `model` with `scheme` and calibrated `ranges`.

    Nodes named in `excluded` stay float; their neighbours still quantize the tensors they
    share with them.
    """
    return _Planner(model, scheme, ranges, excluded).run()


class _Planner:
    def __init__(
        self,
        model: ir.Model,
        scheme: StaticScheme,
        ranges: Mapping[str, TensorRange],
        excluded: frozenset[str] = frozenset(),
    ) -> None:
        self.graph = model.graph
        self.scheme = scheme
        self.ranges = ranges
        self.excluded = excluded
        self.tensors: dict[str, TensorDecision] = {}
        self.nodes: dict[str, NodeDecision] = {}
        self.folds: list[ClampFold] = []

    def run(self) -> QuantPlan:
        for node in self.graph:
            if node.name in self.nodes:
                continue  # a clamp already folded into its producer
            if node.name in self.excluded:
                self._decide(node, False, "excluded: stays float")
            elif node.op_type in ops.QUANTIZED:
                self._plan_quantized(node, ops.QUANTIZED[node.op_type])
            elif node.op_type in ops.PASS_THROUGH:
                self._plan_pass_through(node)
            else:
                self._decide(node, False, "not in the op table: stays float")
        return QuantPlan(
            scheme=self.scheme,
            tensors=MappingProxyType(dict(self.tensors)),
            nodes=tuple(self.nodes.values()),
            folds=tuple(self.folds),
        )

    def _decide(self, node: ir.Node, quantized: bool, reason: str) -> None:
        self.nodes[node.name or ""] = NodeDecision(
            node.name or "", node.op_type, quantized, reason
        )

    def _plan_quantized(self, node: ir.Node, rule: ops.QuantizedOpRule) -> None:
        for index in rule.activations:
            if constant_array(node.inputs[index]) is not None:
                # All-constant arithmetic is folded by onnxruntime; quantizing it gains nothing.
                self._decide(node, False, f"input {index} is a constant: stays float")
                return
            seen = self.ranges.get(node.inputs[index].name)
            if seen is not None and seen.min == seen.max == 0.0:
                # No scale fits a tensor never seen non-zero, and the bias would be stored
                # at an arbitrary one; the node is cheap to leave alone.
                self._decide(node, False, f"input {index} is zero on every sample: stays float")
                return
        for index in rule.activations:
            self._plan_activation(node.inputs[index], f"input of {node.name}")
        weight_params: dict[int, qparams.QParams] = {}
        for index, axis_of in rule.weights.items():
            value = node.inputs[index] if index < len(node.inputs) else None
            if value is None:
                continue
            if constant_array(value) is None:
                self._plan_activation(value, f"input of {node.name}")
            else:
                weight_params[index] = self._plan_weight(node, value, axis_of)
        if rule.bias is not None:
            self._plan_bias(node, rule.bias, weight_params)
        self._plan_output(node)
        self._decide(node, True, "quantized")

    def _plan_pass_through(self, node: ir.Node) -> None:
        source = node.inputs[0] if node.inputs else None
        decision = self.tensors.get(source.name) if source is not None else None
        if decision is None or decision.role is not Role.ACTIVATION:
            self._decide(node, False, "its input is float: stays float")
            return
        output = node.outputs[0]
        if output.is_graph_output():
            self._decide(node, False, "writes a graph output: stays float")
            return
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
        params = self._activation_params(value.name, value.name)
        self.tensors[value.name] = TensorDecision(value.name, Role.ACTIVATION, params, reason)
        return params

    def _activation_params(self, stats_name: str, tensor_name: str) -> qparams.QParams:
        tensor_range = self.ranges.get(stats_name)
        if tensor_range is None:
            raise CalibrationDataError(
                f"The calibration has no range for tensor '{tensor_name}'.",
                hint="calibrate again with this model.",
            )
        return qparams.range_qparams(
            tensor_range.min,
            tensor_range.max,
            self.scheme.activation_dtype,
            symmetric=self.scheme.activation_symmetric,
        )

    def _plan_weight(self, node: ir.Node, value: ir.Value, axis_of) -> qparams.QParams:
        existing = self.tensors.get(value.name)
        if existing is not None:
            return existing.qparams
        weights = constant_array(value)
        axis = (
            axis_of(node, weights.ndim)
            if self.scheme.per_channel and weights.ndim > 1
            else None
        )
        params = qparams.weight_qparams(
            weights,
            self.scheme.weight_dtype,
            axis=axis,
            symmetric=True,
            reduce_range=self.scheme.reduce_range,
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
        bias = node.inputs[bias_index]
        weight = weight_params.get(weight_index)
        if bias.name in self.tensors or weight is None or constant_array(bias) is None:
            return
        if constant_array(bias).ndim != 1 or (
            node.op_type == "Gemm" and node.attributes.get_float("beta", 1.0) != 1.0
        ):
            return  # a bias the integer kernels cannot add as is stays float
        input_params = self.tensors[node.inputs[input_index].name].qparams
        weight_name = node.inputs[weight_index].name
        fitted = qparams.fit_weight_scale_to_bias(
            weight,
            constant_array(node.inputs[weight_index]),
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
            bias.name, Role.BIAS, params, f"bias of {node.name}, int32"
        )

    def _plan_output(self, node: ir.Node) -> None:
        output = node.outputs[0]
        if output.is_graph_output() or output.name in self.tensors:
            return
        chain = _clamp_chain(output)
        # The longest run of clamps that quantization can absorb wins: Relu then Clip(0, 6)
        # is quantized with the Clip's output range, not the Relu's wider one. An excluded
        # clamp stays a node of its own, so the run stops before it.
        for position, clamp in enumerate(chain):
            if clamp.name in self.excluded:
                chain = chain[:position]
                break
        for length in range(len(chain), 0, -1):
            clamps = chain[:length]
            clamped = clamps[-1].outputs[0]
            params = self._activation_params(clamped.name, clamped.name)
            if not _clamp_is_exact(params, _combined_bounds(clamps)):
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
        params = self._activation_params(output.name, output.name)
        self.tensors[output.name] = TensorDecision(
            output.name, Role.ACTIVATION, params, f"output of {node.name}"
        )


def _clamp_chain(value: ir.Value) -> list[ir.Node]:
    """The Relu/Clip nodes that follow `value` one after another, each the only reader."""
    chain = []
    while (clamp := _single_clamp_consumer(value)) is not None:
        if clamp.outputs[0].is_graph_output():
            break
        chain.append(clamp)
        value = clamp.outputs[0]
    return chain


def _combined_bounds(clamps: list[ir.Node]) -> tuple[float, float] | None:
    """The bounds of applying `clamps` in turn (None if any bound is not constant)."""
    bounds = [ops.clamp_bounds(clamp) for clamp in clamps]
    if any(b is None for b in bounds):
        return None
    return max(low for low, _ in bounds), min(high for _, high in bounds)


def _single_clamp_consumer(value: ir.Value) -> ir.Node | None:
    consumers = value.consumers()
    if len(consumers) != 1 or consumers[0].op_type not in ops.CLAMPS:
        return None
    clamp = consumers[0]
    return clamp if clamp.inputs[0] is value else None


def _clamp_is_exact(params: qparams.QParams, bounds: tuple[float, float] | None) -> bool:
    """True when QuantizeLinear's saturation already performs the clamp to `bounds`.

    Q(clamp(x)) == Q(x) for every x when the clamp bounds round to the saturation points:
    low / scale < qmin - zero_point + 1/2 and high / scale > qmax - zero_point - 1/2.
    """
    if bounds is None:
        return False
    low, high = bounds
    info = np.iinfo(params.dtype)
    scale, zero_point = float(params.scale), int(params.zero_point)
    return (
        low / scale < info.min - zero_point + 0.5
        and high / scale > info.max - zero_point - 0.5
    )
