"""What the static planner's rule families share: the decisions so far and the facts they read.

`PlannerState` holds the plan being built (tensors, nodes, folds, notes) and the memo
tables of the graph walks. The rule families (`weights`, `activations`, `concat`,
`answer_head`, `float_islands`, `vectors`, `moves`) are mixins over it, and
`static._Planner` drives them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import onnx_ir as ir

from qconvert.calibration import TensorRange
from qconvert.calibration.observers import TensorObserver
from qconvert.graph_utils import HOLDERS, body_nodes
from qconvert.overrides import FLOAT, Overrides
from qconvert.plan.decisions import (
    ClampFold,
    NodeDecision,
    ScaleFold,
    TensorDecision,
)
from qconvert.schemes import (
    INT8,
    INT16X8,
    StaticScheme,
)
from qconvert.selection import NodeSelection


class PlannerState:
    """The plan being built, the run's inputs, and the small questions every rule asks.

    The rule families call one another's methods through `self`: only `static._Planner`,
    which combines them all, is ever instantiated.
    """

    def __init__(
        self,
        model: ir.Model,
        scheme: StaticScheme,
        ranges: Mapping[str, TensorRange],
        excluded: frozenset[str],
        selection: NodeSelection,
        overrides: Overrides,
        format: str,
        *,
        raised: frozenset[str] = frozenset(),
        histograms: Mapping[str, TensorObserver] | None = None,
    ) -> None:
        self.graph = model.graph
        self.format = format
        self.scheme = scheme
        self.ranges = ranges
        # Calibration statistics, for the rules that weigh a range by the values in it.
        self.histograms = histograms or {}
        self.excluded = excluded
        # Nodes the recipe raised: float compute from int8-stored weights.
        self.raised = raised
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
        # Float layers that read their input's DequantizeLinear (`_plan_float_layer`).
        self.reads_dequantized: set[str] = set()
        # Set by the driver's first walk, before any rule runs.
        self.gelu: frozenset[str] = frozenset()
        self.mixed: dict[str, str] = {}
        # Excluded Relu/Clip nodes whose readers read their float output (`_held_clamps`).
        self.held_clamps: frozenset[str] = frozenset()

    def _nodes(self) -> Iterator[ir.Node]:
        """The main graph's nodes, each If/Loop/Scan followed by the nodes of its bodies.

        Body nodes are planned like any other: calibration passes their tensors out of the
        holder (`calibration.subgraphs`), and the Q/DQ pairs go inside the body.
        """
        for node in self.graph:
            yield node
            if node.op_type in HOLDERS:
                yield from body_nodes(node)

    def _decide(self, node: ir.Node, quantized: bool, reason: str) -> None:
        self.nodes[node.name or ""] = NodeDecision(
            node.name or "", node.op_type, quantized, reason
        )

    def _overridden_float(self, value: ir.Value | None) -> bool:
        return value is not None and self.overrides.tensors.get(value.name or "") == FLOAT

    def _uncalibrated(self, value: ir.Value) -> bool:
        """A tensor calibration never saw: one the opset upgrade added, say."""
        return value.name not in self.ranges and value.name not in self.tensors

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

    def _skip_reason(self, node: ir.Node) -> str | None:
        """Why `node` stays float by the user's choice or a mixed range (the driver's)."""
        raise NotImplementedError

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
