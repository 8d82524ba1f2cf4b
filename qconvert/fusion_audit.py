"""The fusion audit: what onnxruntime's CPU provider really runs of a written model.

A QDQ model only says which values are integers; onnxruntime's graph optimizer decides
which `DequantizeLinear -> op -> QuantizeLinear` groups become integer kernels (QLinearConv,
QGemm, QLinearAdd, ...) and which ops run on the integers with their Q/DQ pair dropped
(Reshape, Transpose, MaxPool, Resize, Slice, Split, ...). Whatever it leaves is a *float
island*: values dequantized, computed in float, and quantized again, which costs two
conversions and the float op besides.

The audit loads the model with every optimization the CPU provider applies at run time
(`ORT_ENABLE_ALL`: the QDQ fusions are level 2, the NHWC and NCHWc layouts level 3) and
writes the optimized graph (`SessionOptions.optimized_model_filepath`). In that graph:

1. integer kernels are the nodes of `INTEGER_KERNELS`, counted by op type;
2. a float island is a connected group of nodes that are both reached from an activation's
   DequantizeLinear and reach a QuantizeLinear, through nodes other than Q/DQ (a DQ of a
   constant is a weight, not a value on the way, so it starts nothing);
3. an island is *planned* when the plan meant it: its nodes are ones the plan left float
   on purpose, or ones the op table quantizes knowing onnxruntime has no integer form for
   them (`ops.QDQ_FLOAT_ISLANDS`). Any other island is a kernel the plan expected and
   did not get: `quantize --strict-kernels` fails on it;
4. the other way round, a node the plan keeps float next to quantized values (it reads a
   DequantizeLinear or a QuantizeLinear reads it) is *lost* when onnxruntime did not run
   it in float: an integer kernel carries its name or writes its output, or it is gone
   (a Relu or Clip kept float on purpose, dropped into the QuantizeLinear or the integer
   kernel beside it).
   An exclusion the user asked for then does not hold, and `--strict-kernels` fails.
"""

from __future__ import annotations

import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from qconvert import ops
from qconvert.gates import GateResult
from qconvert.plan import QuantPlan
from qconvert.runtime import make_session

INTEGER_KERNELS: frozenset[str] = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "QGemm",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "ConvInteger",
        "DynamicQuantizeMatMul",
        "DynamicQuantizeLSTM",
        "QAttention",
        "QLinearAdd",
        "QLinearMul",
        "QLinearConcat",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        "QLinearLeakyRelu",
        "QLinearSigmoid",
        "QLinearSoftmax",
        "QLinearWhere",
        "QLinearReduceMean",
        "QEmbedLayerNormalization",
    }
)
"""Ops (ai.onnx or com.microsoft) that compute on integers."""

_QUANTIZE = frozenset({"QuantizeLinear", "DynamicQuantizeLinear"})
_DEQUANTIZE = frozenset({"DequantizeLinear"})
_SHAPE_READERS = frozenset({"Shape", "Size"})
"""They read a float tensor's shape, not its values: float stops there."""

_FUSED_PREFIXES = ("fused ",)
"""onnxruntime names a node it fuses (Conv + Relu into FusedConv) after the first one."""

_RENAMED = re.compile(r"(_token_\d+|_nchwc)$")
"""Suffixes onnxruntime's layout passes (NHWC, NCHWc) add to the names they rewrite."""


@dataclass(frozen=True, slots=True)
class LostNode:
    """A node the plan keeps float that onnxruntime did not run in float."""

    name: str
    op_type: str
    ran_as: str
    """The integer kernel that runs it, or "dropped" where no node of it is left."""
    reason: str
    """The plan's reason for keeping it float."""


@dataclass(frozen=True, slots=True)
class IslandNode:
    """One float node of an island, as onnxruntime's optimized graph names it."""

    name: str
    op_type: str
    planned: bool | None
    """True: the plan meant it float; False: it meant an integer kernel; None: a node
    onnxruntime made (a layout Transpose, a reorder), which takes its island's word."""
    reason: str


@dataclass(frozen=True, slots=True)
class FloatIsland:
    """Nodes that read dequantized values and write values quantized again."""

    nodes: tuple[IslandNode, ...]

    @property
    def planned(self) -> bool:
        """Whether the plan meant its nodes to compute in float (and knew one of them)."""
        known = [node.planned for node in self.nodes if node.planned is not None]
        return bool(known) and all(known)


@dataclass(frozen=True, slots=True)
class FusionAudit:
    """What the CPU provider runs: integer kernels, Q/DQ nodes left, float islands.

    Attributes:
        integer_kernels: integer kernels of the optimized graph, by op type.
        quantize_nodes: QuantizeLinear nodes left in it.
        dequantize_nodes: DequantizeLinear nodes left in it (of activations and weights).
        islands: the float islands, in graph order.
        nodes: the optimized graph's node count.
        lost: nodes planned float that run as (or inside) an integer kernel.
    """

    integer_kernels: dict[str, int] = field(default_factory=dict)
    quantize_nodes: int = 0
    dequantize_nodes: int = 0
    islands: tuple[FloatIsland, ...] = ()
    nodes: int = 0
    lost: tuple[LostNode, ...] = ()
    """Nodes the plan keeps float that onnxruntime ran on the integers."""

    @property
    def kernel_count(self) -> int:
        """Integer kernels in all."""
        return sum(self.integer_kernels.values())

    def to_dict(self) -> dict:
        """The JSON form (the report's `fusion_audit`)."""
        return {
            "integer_kernels": dict(self.integer_kernels),
            "kernel_count": self.kernel_count,
            "quantize_nodes": self.quantize_nodes,
            "dequantize_nodes": self.dequantize_nodes,
            "nodes": self.nodes,
            "islands_by_op": self.islands_by_op(),
            "unplanned_islands": len(self.unplanned),
            "lost_float": [
                {
                    "name": node.name,
                    "op_type": node.op_type,
                    "ran_as": node.ran_as,
                    "reason": node.reason,
                }
                for node in self.lost
            ],
            "islands": [
                {
                    "planned": island.planned,
                    "nodes": [
                        {
                            "name": node.name,
                            "op_type": node.op_type,
                            "planned": node.planned,
                            "reason": node.reason,
                        }
                        for node in island.nodes
                    ],
                }
                for island in self.islands
            ],
        }

    @property
    def unplanned(self) -> tuple[FloatIsland, ...]:
        """The islands the plan did not mean."""
        return tuple(island for island in self.islands if not island.planned)

    def islands_by_op(self, *, planned: bool | None = None) -> dict[str, int]:
        """How many island nodes of each op type (only planned or unplanned ones if set)."""
        counts = Counter(
            node.op_type
            for island in self.islands
            if planned is None or island.planned == planned
            for node in island.nodes
        )
        return dict(sorted(counts.items()))


OPTIMIZED_CONFIG = {
    # Weights go beside the optimized graph: the audit reads only nodes, and a model of
    # over 2 GB could not be written as one protobuf.
    "session.optimized_model_external_initializers_file_name": "weights.bin",
    "session.optimized_model_external_initializers_min_size_in_bytes": "1024",
}
"""Session config entries for a session that writes its optimized graph to audit."""


def audit_model(model: bytes | str, plan: QuantPlan | None = None) -> FusionAudit:
    """Optimizes `model` as the CPU provider does at run time and audits the result.

    `model` is the serialized model or its path. Without a plan every island counts as
    unplanned (the peer's models, in the bench).
    """
    if isinstance(model, bytes):
        written = onnx.load_model_from_string(model).graph
    else:
        written = onnx.load(model, load_external_data=False).graph
    with tempfile.TemporaryDirectory(prefix="qconvert-audit-") as folder:
        path = Path(folder) / "optimized.onnx"
        make_session(model, quiet=True, optimized_path=path, config=OPTIMIZED_CONFIG)
        return audit_file(path, plan, written=written)


def audit_file(
    path: Path, plan: QuantPlan | None = None, *, written: onnx.GraphProto | None = None
) -> FusionAudit:
    """Audits the optimized graph a session wrote to `path` (its weights are not read)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return audit_graph(graph, plan, written=written)


def audit_graph(
    graph: onnx.GraphProto,
    plan: QuantPlan | None = None,
    *,
    written: onnx.GraphProto | None = None,
) -> FusionAudit:
    """Audits an optimized graph (see the module docstring).

    `written` is the graph as qconvert wrote it: onnxruntime renames the nodes it rewrites
    (a Conv in the NCHWc layout, a HardSwish expanded into HardSigmoid and Mul), but they
    still write the tensors the original wrote, which name the plan's node.
    """
    constants = {tensor.name for tensor in graph.initializer}
    constants.update(
        output for node in graph.node if node.op_type == "Constant" for output in node.output
    )
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            if name:
                readers.setdefault(name, []).append(index)
    writers = {name: index for index, node in enumerate(graph.node) for name in node.output}

    def passes_float(node: onnx.NodeProto) -> bool:
        return node.op_type not in _QUANTIZE | _DEQUANTIZE | _SHAPE_READERS

    # Forward from every activation DequantizeLinear, backward from every QuantizeLinear.
    reached: set[int] = set()
    stack = [
        reader
        for node in graph.node
        if node.op_type in _DEQUANTIZE and node.input and node.input[0] not in constants
        for output in node.output
        for reader in readers.get(output, ())
    ]
    while stack:
        index = stack.pop()
        if index in reached or not passes_float(graph.node[index]):
            continue
        reached.add(index)
        stack.extend(r for output in graph.node[index].output for r in readers.get(output, ()))
    reaching: set[int] = set()
    stack = [
        writers[node.input[0]]
        for node in graph.node
        if node.op_type in _QUANTIZE and node.input and node.input[0] in writers
    ]
    while stack:
        index = stack.pop()
        if index in reaching or not passes_float(graph.node[index]):
            continue
        reaching.add(index)
        stack.extend(writers[name] for name in graph.node[index].input if name in writers)
    islands = _components(graph, reached & reaching, readers, writers)
    decisions = {node.name: node for node in plan.nodes} if plan is not None else {}
    if written is not None:
        producers = {
            output: node.name for node in written.node for output in node.output if output
        }
        decisions.update(
            (tensor, decisions[name])
            for tensor, name in producers.items()
            if name in decisions and tensor not in decisions
        )
    expanded = _hardswish_bodies(graph, writers)
    kernels = Counter(node.op_type for node in graph.node if node.op_type in INTEGER_KERNELS)
    lost = _lost_float(graph, plan, written) if plan is not None and written else ()
    return FusionAudit(
        integer_kernels=dict(sorted(kernels.items())),
        quantize_nodes=sum(1 for node in graph.node if node.op_type in _QUANTIZE),
        dequantize_nodes=sum(1 for node in graph.node if node.op_type in _DEQUANTIZE),
        islands=tuple(
            FloatIsland(
                tuple(_island_node(graph.node[i], decisions, i in expanded) for i in members)
            )
            for members in islands
        ),
        nodes=len(graph.node),
        lost=lost,
    )


def _names(node: onnx.NodeProto) -> list[str]:
    """The plan's names `node` may carry after onnxruntime renamed it."""
    names = [node.name]
    names += [node.name.removeprefix(p) for p in _FUSED_PREFIXES if node.name.startswith(p)]
    return names + [_RENAMED.sub("", name) for name in names]


def _lost_float(
    graph: onnx.GraphProto, plan: QuantPlan, written: onnx.GraphProto
) -> tuple[LostNode, ...]:
    """Nodes the plan keeps float, beside quantized values, that do not run in float."""
    floats = {decision.name: decision for decision in plan.nodes if not decision.quantized}
    dequantized = {
        output
        for node in written.node
        if node.op_type in _DEQUANTIZE
        for output in node.output
    }
    quantized = {
        node.input[0] for node in written.node if node.op_type in _QUANTIZE and node.input
    }
    # What the optimized graph runs, by the names and output tensors that trace it back.
    runs: dict[str, str] = {}
    for node in graph.node:
        if node.op_type in _QUANTIZE | _DEQUANTIZE:
            continue
        keys = _names(node) + [
            o for output in node.output for o in (output, _RENAMED.sub("", output))
        ]
        for key in keys:
            # A float node that writes the tensor runs it in float, whatever else does.
            if key and (key not in runs or node.op_type not in INTEGER_KERNELS):
                runs[key] = node.op_type
    lost = []
    for node in written.node:
        decision = floats.get(node.name)
        if decision is None:
            continue
        beside = any(name in dequantized for name in node.input) or any(
            name in quantized for name in node.output
        )
        if not beside:
            continue  # no Q/DQ around it, nothing to fuse it into
        ran = [runs[key] for key in (node.name, *node.output) if key in runs]
        if ran and not any(op not in INTEGER_KERNELS for op in ran):
            lost.append(LostNode(node.name, node.op_type, ran[0], decision.reason))
        elif (
            not ran
            and node.op_type in ops.CLAMPS
            # Left float only for want of a rule, a clamp the QuantizeLinear saturates
            # to computes the same there: only one kept float on purpose is lost.
            and decision.reason != ops.NOT_IN_TABLE_REASON
        ):
            lost.append(LostNode(node.name, node.op_type, "dropped", decision.reason))
    return tuple(lost)


def _components(
    graph: onnx.GraphProto,
    members: set[int],
    readers: dict[str, list[int]],
    writers: dict[str, int],
) -> list[list[int]]:
    """`members` split into groups connected through the tensors they share."""
    seen: set[int] = set()
    groups = []
    for start in sorted(members):
        if start in seen:
            continue
        group, stack = [], [start]
        seen.add(start)
        while stack:
            index = stack.pop()
            group.append(index)
            node = graph.node[index]
            near = [r for output in node.output for r in readers.get(output, ())]
            near += [writers[name] for name in node.input if name in writers]
            for other in near:
                if other in members and other not in seen:
                    seen.add(other)
                    stack.append(other)
        groups.append(sorted(group))
    return groups


def _hardswish_bodies(graph: onnx.GraphProto, writers: dict[str, int]) -> set[int]:
    """Nameless Mul(x, HardSigmoid(x; 1/6, 1/2)) pairs: HardSwish as onnxruntime expands it.

    The expansion may write a tensor of its own making and read a DequantizeLinear
    onnxruntime added, so neither its names nor its tensors lead back to the plan's node.
    """
    found: set[int] = set()
    for index, node in enumerate(graph.node):
        if node.op_type != "Mul" or node.name or len(node.input) != 2:
            continue
        for x, gate in (node.input, reversed(node.input)):
            writer = writers.get(gate)
            sigmoid = graph.node[writer] if writer is not None else None
            if (
                sigmoid is not None
                and sigmoid.op_type == "HardSigmoid"
                and not sigmoid.name
                and list(sigmoid.input) == [x]
                and _attribute(sigmoid, "alpha", 0.2) == float(np.float32(1 / 6))
                and _attribute(sigmoid, "beta", 0.5) == 0.5
            ):
                found.update((index, writer))
    return found


def _attribute(node: onnx.NodeProto, name: str, default: float) -> float:
    """A float attribute of `node`, as float32 (`default` when it is not set)."""
    for attribute in node.attribute:
        if attribute.name == name:
            return float(np.float32(attribute.f))
    return float(np.float32(default))


def _island_node(
    node: onnx.NodeProto, decisions: dict, hardswish_body: bool = False
) -> IslandNode:
    """The island node with the plan's word on it."""
    name = node.name
    keys = [name, *(name.removeprefix(p) for p in _FUSED_PREFIXES if name.startswith(p))]
    # By the tensors it writes: under their own names, or with the layout's suffix.
    keys += [o for output in node.output for o in (output, output.removesuffix("_nchwc"))]
    decision = next((decisions[key] for key in keys if key and key in decisions), None)
    if decision is None and hardswish_body:
        return IslandNode(name, node.op_type, True, ops.FLOAT_REASONS["HardSwish"])
    if decision is None:
        return IslandNode(name, node.op_type, None, "not a node of the plan")
    if not decision.quantized:
        return IslandNode(name, node.op_type, True, decision.reason)
    why = ops.QDQ_FLOAT_ISLANDS.get(decision.op_type)
    if why is not None:
        return IslandNode(name, node.op_type, True, why)
    return IslandNode(
        name, node.op_type, False, f"planned quantized ({decision.reason}), left float"
    )


def kernel_gates(audit: FusionAudit | None) -> tuple[GateResult, ...]:
    """The `strict-kernels` gate: no float island the plan did not mean, no exclusion lost.

    Without an audit (onnxruntime could not write its optimized graph) the gate fails: a
    gate that cannot be checked must not pass silently.
    """
    measured = None if audit is None else float(len(audit.unplanned) + len(audit.lost))
    return (
        GateResult(
            gate="strict-kernels",
            threshold=0.0,
            measured=measured,
            unit="unplanned islands or lost float nodes",
            passed=measured == 0.0,
        ),
    )
