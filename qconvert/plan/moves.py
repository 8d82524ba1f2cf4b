"""A quantized op's input built by copying one float tensor: quantize that tensor instead.

Frames cut from a signal (`passes/frames.py`: Slice, Reshape, Slices, Concat) copy each
sample into two frames or more. Quantized where the MatMul reads them, every move before
runs in float and the QuantizeLinear rounds the copies; quantized at the signal, the moves
copy uint8 (a quarter of the bytes) and the Concat copies integers on one grid. On a
voice-activity detector's STFT front end (64 x 704 samples into 64 x 4 frames of 256):
float moves and QuantizeLinear 79 us of one thread, uint8 moves 40 us.

Only where a Concat duplicates values (the moves grow the data), every value between the
source and the reader is read by the moves alone, and calibration saw the source.
"""

from __future__ import annotations

import functools

import onnx_ir as ir

from qconvert import ops, qparams
from qconvert.graph_utils import constant_array
from qconvert.plan.decisions import Role, TensorDecision
from qconvert.plan.planner_state import PlannerState


class MovedInputRules(PlannerState):
    """Plans a quantized op's input at the float tensor its moves copy (module docstring)."""

    @functools.cached_property
    def _node_positions(self) -> dict[int, int]:
        """Each node's position in the graph, by id: to walk up latest first (once a plan)."""
        return {id(node): index for index, node in enumerate(self._nodes())}

    def _plan_moved_activation(self, value: ir.Value, reason: str) -> qparams.QParams | None:
        """`_plan_activation`, at the source of the moves that write `value` where they pay."""
        found = None if value.name in self.tensors else self._moved_source(value)
        if found is None:
            return self._plan_activation(value, reason)
        source, moves = found
        params = self._plan_activation(source, f"{reason}, quantized before the moves to it")
        if params is None:
            return self._plan_activation(value, reason)
        for node in moves:
            for output in node.outputs:
                self.tensors[output.name] = TensorDecision(
                    output.name,
                    Role.ACTIVATION,
                    params,
                    f"shares the parameters of {source.name}",
                )
            self._decide(node, True, "passes quantized values through")
        return params

    def _moved_source(self, value: ir.Value) -> tuple[ir.Value, list[ir.Node]] | None:
        """(the one float tensor `value` copies, the moves in graph order), or None.

        Walks up from `value` latest node first, so a copy is taken for a move only once
        every reader of it is one; the first value read elsewhere is the source.
        """
        if not _movable(value.producer()):
            return None  # most inputs: written by a computing op
        order = self._node_positions
        moves: dict[int, ir.Node] = {}
        sources: set[str] = set()
        found: dict[str, ir.Value] = {}
        pending = {value.name: value}
        while pending:
            name = max(pending, key=lambda n: order.get(id(pending[n].producer()), -1))
            current = pending.pop(name)
            node = current.producer()
            read_by_moves = current is value or (
                not current.is_graph_output()
                and all(id(reader) in moves for reader in current.consumers())
            )
            if not read_by_moves or not _movable(node) or current.name in self.tensors:
                sources.add(current.name)
                found[current.name] = current
                continue
            moves[id(node)] = node
            data = node.inputs if node.op_type == "Concat" else node.inputs[:1]
            pending.update((v.name, v) for v in data if v is not None)
        if len(sources) != 1 or not any(n.op_type == "Concat" for n in moves.values()):
            return None
        source = found[sources.pop()]
        if source.name in self.tensors or source.name not in self.ranges:
            return None
        if any(self._skip_reason(n) for n in moves.values()):
            return None
        return source, sorted(moves.values(), key=lambda n: order.get(id(n), 0))


def _movable(node: ir.Node | None) -> bool:
    """A node that copies values (a Concat, or a pass-through op but MaxPool)."""
    if node is None or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Concat":
        return True
    return (
        node.op_type in ops.PASS_THROUGH
        and node.op_type != "MaxPool"
        and len(node.outputs) == 1
        and all(_index_operand(v) for v in node.inputs[1:] if v is not None)
    )


def _index_operand(value: ir.Value) -> bool:
    """A move's operand that says where or what shape (a constant, or computed integers)."""
    if constant_array(value) is not None:
        return True
    return value.dtype in (ir.DataType.INT64, ir.DataType.INT32)
