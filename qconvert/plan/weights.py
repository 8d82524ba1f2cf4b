"""Static planning rules for weights and biases.

Weights per channel (or per tensor) in the weight type, biases as int32 at input scale x
weight scale, a MatMul's bias Add taken in as one layer with it, the int8-stored weights
of layers that compute in float (recurrent layers among them), and the weights of float
nodes inside If/Loop/Scan.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir

from qconvert import ops, qparams
from qconvert.graph_utils import HOLDERS, constant_array, subgraph_nodes
from qconvert.plan.decisions import (
    Role,
    TensorDecision,
)
from qconvert.plan.planner_state import PlannerState
from qconvert.schemes import StaticScheme


class WeightRules(PlannerState):
    """Plans the weights, biases and constant operands of the nodes the driver quantizes."""

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

    def _plan_weights_of_float_ops(self) -> None:
        """Stores the W and R of recurrent layers (`ops.FLOAT_RUN_WEIGHTS`) as int8, per row.

        onnxruntime has no static integer LSTM, GRU or RNN, so they compute in float; their
        weights are still stored as int8 and read through Mul(Cast(W_q), scale), which
        onnxruntime folds into a float initializer when it loads the model: a quarter of
        the bytes, no cost at run time (a voice-activity detector's LSTM held 42% of its
        float file).

        One scale per row (axis 1, per tensor under --per-tensor): a row holds the weights
        of one gate unit, whose dot product with the input (or hidden state) is one
        pre-activation, as an output channel's is in a Conv. On that detector, with only
        its LSTM's W and R rounded, the output kept 45.8 dB per row, against 42.3 dB with one
        scale per input column and 39.7 dB per tensor. A bidirectional layer shares
        each row's scale between its two directions (one axis per tensor). Rounding is to
        nearest on [-127, 127]: the weights run in float, so no range is kept free for an
        integer kernel. A node the user leaves float (--exclude, an override) keeps its
        weights float as well.
        """
        for node in self._nodes():
            indices = ops.FLOAT_RUN_WEIGHTS.get(node.op_type)
            decision = self.nodes.get(node.name or "")
            if (
                indices is None
                or node.domain not in ("", "ai.onnx")
                or decision is None
                or decision.quantized
                or self._skip_reason(node) is not None
            ):
                continue
            stored = 0
            for index in indices:
                value = node.inputs[index] if index < len(node.inputs) else None
                weights = constant_array(value)
                if (
                    weights is None
                    or weights.dtype != np.float32
                    or weights.ndim != 3
                    or not value.is_initializer()
                    or value.name in self.tensors
                    or self._overridden_float(value)
                ):
                    continue
                axis = 1 if self.scheme.per_channel else None
                params = qparams.weight_qparams(
                    weights,
                    self.overrides.tensor_dtype(value.name or "") or self.scheme.weight_dtype,
                    axis=axis,
                    symmetric=True,
                )
                granularity = "one scale per row" if axis is not None else "per tensor"
                self.tensors[value.name] = TensorDecision(
                    value.name,
                    Role.WEIGHT,
                    params,
                    f"weight of {node.name}, which computes in float: stored as int8, "
                    f"{granularity}, dequantized when the model loads",
                )
                stored += 1
            eight_bit = np.dtype(self.scheme.activation_dtype).itemsize == 1
            if stored and node.op_type == "LSTM" and eight_bit:
                # `passes/recurrent`: the integer LSTM kernel reads the stored integers.
                self._decide(
                    node,
                    False,
                    f"{decision.reason}; its {stored} weight tensor(s) stored as int8 and "
                    "run on onnxruntime's integer LSTM (com.microsoft DynamicQuantizeLSTM: "
                    "X and H quantized at every step)",
                )
            elif stored:
                self._decide(
                    node,
                    False,
                    f"{decision.reason}; its {stored} weight tensor(s) stored as int8 "
                    "(dequantized when the model loads: int8-stored, float-run)",
                )
