"""Planning int4: which MatMul/Gemm weights (and embedding tables) go to blocked 4 bits.

A node's weight is quantized when it is a float32 2-D initializer the node multiplies by
along a known reduction axis:

1. MatMul whose second input is such a weight (K, N): blocks along K.
2. Gemm with such a B: (K, N), or (N, K) with transB. Written as MatMulNBits only when
   transA = 0, alpha = 1 and C is absent or a constant of N values (folded in as its bias,
   times beta); otherwise it keeps its float weight and says why. Blocked QDQ keeps the
   Gemm itself, so any Gemm goes.
3. With `quantize_embeddings`, Gather (axis 0) of such a table (V, D): blocks along D, as
   com.microsoft GatherBlockQuantized reads them; D must be a multiple of the block size.

A node an override sets to `int8` keeps 8-bit blocks; `float`, `--exclude` and
`--include-only` keep it float. Every node is listed with its reason.

Tied embeddings (qop, symmetric 4 bits): a MatMul/Gemm whose weight is the table of a
planned Gather, transposed (Gemm with transB on the same initializer, or a (D, V) weight
holding the table's transpose, as exporters write a tied output projection), reads the
table's blocks along D, the same blocks MatMulNBits wants along K. Such a node is marked
`tied_to` the table: the pass writes the packed codes once for both.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import MappingProxyType

import numpy as np
import onnx_ir as ir

from qconvert.errors import OverrideFileError
from qconvert.graph_utils import constant_array
from qconvert.overrides import FLOAT, Overrides
from qconvert.plan.common import check_overrides, skip_reason
from qconvert.plan.decisions import NodeDecision, QuantPlan
from qconvert.schemes import BlockedWeightScheme
from qconvert.selection import NodeSelection

INT4_NODE_PRECISIONS = (FLOAT, "int4", "int8")
"""What an override may set a node to in an int4 run."""


@dataclass(frozen=True, slots=True)
class BlockedWeight:
    """One node whose weight is stored in blocks.

    Attributes:
        node: the node's name.
        op_type: MatMul, Gemm or Gather.
        weight: the initializer's name.
        bits: 4, or 8 where an override keeps the node at 8 bits.
        transposed: the initializer is (N, K), the reduction axis last (Gemm with transB,
            Gather tables); else (K, N).
        tied_to: for an output projection tied to an embedding table, the table's
            initializer, whose codes it shares; else None.
    """

    node: str
    op_type: str
    weight: str
    bits: int
    transposed: bool
    tied_to: str | None = None


@dataclass(frozen=True, slots=True)
class Int4Plan:
    """The int4 decisions: the blocked weights, and the node-by-node plan for the report."""

    scheme: BlockedWeightScheme
    weights: tuple[BlockedWeight, ...]
    plan: QuantPlan


def make_int4_plan(
    model: ir.Model,
    scheme: BlockedWeightScheme,
    *,
    format: str,
    selection: NodeSelection | None = None,
    overrides: Overrides | None = None,
    quantize_embeddings: bool = False,
) -> Int4Plan:
    """Plans an int4 run over the main graph (see the module docstring for the rules)."""
    selection = selection or NodeSelection()
    overrides = overrides or Overrides()
    _check_int4_overrides(model, overrides)
    weights: list[BlockedWeight] = []
    nodes: list[NodeDecision] = []
    for node in model.graph:
        name = node.name or ""
        found = _blocked_weight(node, scheme, format, quantize_embeddings)
        reason = found if isinstance(found, str) else skip_reason(node, selection, overrides)
        if reason is not None:
            nodes.append(NodeDecision(name, node.op_type, False, reason))
            continue
        weight, transposed = found
        bits = 8 if overrides.nodes.get(name) == "int8" else scheme.bits
        weights.append(BlockedWeight(name, node.op_type, weight, bits, transposed))
        label = (
            f"{bits}-bit weight kept by {overrides.source}"
            if bits != scheme.bits
            else f"{bits}-bit weight, blocks of {scheme.block_size}"
        )
        nodes.append(NodeDecision(name, node.op_type, True, label))
    weights, nodes, tied = _tie_embeddings(model, weights, nodes, scheme, format)
    kind = "symmetric" if scheme.symmetric else "asymmetric (a zero point per block)"
    notes = [
        f"int4: {len(weights)} weight(s) stored in {kind} blocks of {scheme.block_size} along "
        "the reduction axis; activations stay float32."
    ]
    if tied:
        notes.append(
            "Tied embeddings: "
            + ", ".join(f"{node} shares the 4-bit codes of table '{t}'" for node, t in tied)
            + ". GatherBlockQuantized (uint8 data, bits 4) and MatMulNBits read one packed "
            "(V, k_blocks, block_size / 2) initializer; the scales are written twice, since "
            "MatMulNBits takes them as (V * k_blocks) or (V, k_blocks) and "
            "GatherBlockQuantized as (V, k_blocks, 1), its data's rank. The shared codes "
            "are the table's round-to-nearest ones."
        )
    eight = [w.node for w in weights if w.bits == 8]
    if eight:
        notes.append(f"Kept at 8 bits by the override file: {', '.join(eight)}.")
    plan = QuantPlan(
        scheme=scheme,
        tensors=MappingProxyType({}),
        nodes=tuple(nodes),
        folds=(),
        format=f"int4-{format}",
        notes=tuple(notes),
    )
    return Int4Plan(scheme=scheme, weights=tuple(weights), plan=plan)


def _tie_embeddings(
    model: ir.Model,
    weights: list[BlockedWeight],
    nodes: list[NodeDecision],
    scheme: BlockedWeightScheme,
    format: str,
) -> tuple[list[BlockedWeight], list[NodeDecision], list[tuple[str, str]]]:
    """Marks output projections tied to a planned embedding table (module docstring)."""
    if format != "qop" or not scheme.symmetric:
        return weights, nodes, []
    graph = model.graph
    gathers = {
        entry.weight: entry
        for entry in weights
        if entry.op_type == "Gather" and entry.bits == 4 and _known_rank(graph, entry.node)
    }
    tied: list[tuple[str, str]] = []
    out: list[BlockedWeight] = []
    for entry in weights:
        table = None
        if entry.op_type != "Gather" and entry.bits == 4:
            table = _tied_table(graph, entry, gathers)
        if table is not None:
            entry = replace(entry, tied_to=table)
            tied.append((entry.node, table))
        out.append(entry)
    if tied:
        labels = {node: table for node, table in tied}
        nodes = [
            replace(d, reason=f"{d.reason}, codes shared with table '{labels[d.name]}'")
            if d.name in labels
            else d
            for d in nodes
        ]
    return out, nodes, tied


def _known_rank(graph: ir.Graph, node_name: str) -> bool:
    node = next(n for n in graph if n.name == node_name)
    indices = node.inputs[1]
    return indices is not None and indices.shape is not None


def _tied_table(
    graph: ir.Graph, entry: BlockedWeight, gathers: dict[str, BlockedWeight]
) -> str | None:
    """The table `entry`'s weight is the transpose of, if any."""
    if entry.transposed:
        return entry.weight if entry.weight in gathers else None
    weight = graph.initializers[entry.weight].const_value
    for name in gathers:
        table = graph.initializers[name].const_value
        if tuple(weight.shape) == tuple(table.shape)[::-1] and _is_transpose(weight, table):
            return name
    return None


_COMPARE_ROWS = 64


def _is_transpose(weight: ir.TensorProtocol, table: ir.TensorProtocol) -> bool:
    """weight == table.T, compared a corner first, then a band of rows at a time."""
    equal = _equal_transposed(weight.numpy(), table.numpy())
    for tensor in (weight, table):
        release = getattr(tensor, "release", None)
        if release is not None:
            release()  # unmap external data: the save reads it again, a tensor at a time
    return equal


def _equal_transposed(w: np.ndarray, t: np.ndarray) -> bool:
    # a corner first: a few pages of each, where a band of the table's columns would read
    # every page of it
    corner = min(_COMPARE_ROWS, *w.shape)
    if not np.array_equal(w[:corner, :corner], t[:corner, :corner].T):
        return False
    return all(
        np.array_equal(w[start : start + _COMPARE_ROWS], t[:, start : start + _COMPARE_ROWS].T)
        for start in range(0, w.shape[0], _COMPARE_ROWS)
    )


def _blocked_weight(
    node: ir.Node, scheme: BlockedWeightScheme, format: str, embeddings: bool
) -> tuple[str, bool] | str:
    """(weight name, transposed) when the node's weight can be blocked, else why not."""
    if node.op_type not in ("MatMul", "Gemm", "Gather") or node.domain not in ("", "ai.onnx"):
        return "weight-only scheme: no weight to block, runs float"
    if node.op_type == "Gather":
        if not embeddings:
            return "embedding table: stays float (pass --quantize-embeddings)"
        table = node.inputs[0]
        problem = _weight_problem(table)
        if problem:
            return problem
        if node.attributes.get_int("axis", 0) != 0:
            return "Gather along an axis other than 0: stays float"
        width = table.const_value.shape[1]
        if width % scheme.block_size:
            return (
                f"table width {width} is not a multiple of the block size "
                f"{scheme.block_size}: stays float"
            )
        return table.name, True
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    problem = _weight_problem(weight)
    if problem:
        return problem
    if node.op_type == "MatMul":
        return weight.name, False
    transposed = bool(node.attributes.get_int("transB", 0))
    if format == "qop":
        problem = _gemm_problem(node, weight, transposed)
        if problem:
            return problem
    return weight.name, transposed


def _weight_problem(value: ir.Value | None) -> str | None:
    array = constant_array(value)
    if array is None:
        return "its weight is not a constant initializer: stays float"
    if array.dtype != np.float32:
        return f"its weight is {array.dtype}, not float32: stays float"
    if array.ndim != 2:
        return f"its weight has {array.ndim} dims, not 2: stays float"
    return None


def _gemm_problem(node: ir.Node, weight: ir.Value, transposed: bool) -> str | None:
    if node.attributes.get_int("transA", 0):
        return "Gemm with transA has no MatMulNBits form: stays float (use --format qdq)"
    if node.attributes.get_float("alpha", 1.0) != 1.0:
        return "Gemm with alpha != 1 has no MatMulNBits form: stays float (use --format qdq)"
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = constant_array(node.inputs[2])
        n = weight.const_value.shape[0 if transposed else 1]
        if bias is None or bias.size != n or (bias.ndim == 2 and bias.shape[0] != 1):
            return (
                "Gemm whose C is not a constant of N values has no MatMulNBits form: "
                "stays float (use --format qdq)"
            )
    return None


def _check_int4_overrides(model: ir.Model, overrides: Overrides) -> None:
    """Node overrides may say float, int4 or int8; tensor overrides do not apply."""
    for name, precision in overrides.nodes.items():
        if precision not in INT4_NODE_PRECISIONS:
            raise OverrideFileError(
                f"Override file '{overrides.source}' sets node '{name}' to '{precision}', "
                "which a --scheme int4 run cannot apply.",
                hint="in this scheme a node override is 'float', 'int4' or 'int8'.",
            )
    names_only = Overrides(
        nodes=MappingProxyType(dict.fromkeys(overrides.nodes, FLOAT)),
        tensors=overrides.tensors,
        source=overrides.source,
    )
    check_overrides(model, names_only, static=False, scheme="int4")
