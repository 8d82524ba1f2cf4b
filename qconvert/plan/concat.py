"""Static planning rules for Concat, pass-through ops and mixed ranges.

The inputs of a quantized Concat share its output's parameters, so it copies integers;
a Concat (or an Add) whose inputs' ranges differ by more than MIXED_RANGE_RATIO stays
float, with what follows it; pass-through ops (Reshape, Transpose, MaxPool, ...) share
their input's parameters.
"""

from __future__ import annotations

import onnx_ir as ir

from qconvert import ops, qparams
from qconvert.plan.answer_head import FEEDS_ANSWER_REASON
from qconvert.plan.decisions import (
    Role,
    TensorDecision,
)
from qconvert.plan.planner_state import PlannerState

MIXED_RANGE_RATIO = 100.0
"""A Concat whose inputs' ranges differ by more than this factor stays float."""


class ConcatRules(PlannerState):
    """Plans Concats, pass-through ops, and what mixed ranges hold float."""

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

    def _mixed_range_add(self, add: ir.Node) -> str | None:
        """Why an Add of two activations of very different ranges stays float.

        An attention mask (-10000 where a token is padding) added to attention scores of
        order 10 is the common case: one output scale spans the mask, rounds the scores
        away, and the Softmax after it sees noise. `make bench` measured a 6-layer sentence
        encoder's embeddings at cosine 0.46 with such Adds quantized, 0.99 with them float.
        """
        if self._mixed_range(add) is None:
            return None
        return (
            "mixed-range Add: one input spans over "
            f"{MIXED_RANGE_RATIO:.0f}x the range of the other, so one scale would round "
            "the smaller away: stays float"
        )

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
            self._decide(node, False, FEEDS_ANSWER_REASON)
            return
        for output in node.outputs:
            self.tensors[output.name] = TensorDecision(
                output.name,
                Role.ACTIVATION,
                decision.qparams,
                f"shares the parameters of {source.name}",
            )
        self._decide(node, True, "passes quantized values through")
