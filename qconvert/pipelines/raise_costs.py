"""What raising a node costs: the multiply-accumulates it moves from int8 to float kernels.

A node the recipe raises computes in float from int8-stored weights (`plan.static`'s
`RAISED_REASON`): its weights stay in the file as integers, dequantized once when the
model loads, so the file does not grow; what grows is the work done on float kernels.
That is the node's own multiply-accumulates and those of every node the plan makes float
with it: the layer writing its input, which would otherwise run as a float kernel between
Q/DQ pairs (`plan.float_islands`' float-reader rule), is planned float too. So the cost of
a set of raised nodes is read from the plan itself: the work of the nodes the base plan
quantizes and the raised plan does not (`raise_cost`).

Work is counted from the shapes of a real run: the model's inputs set to the first
held-out sample's shapes and ONNX shape inference run over the graph, and what it cannot
tell read from one float run on that sample (`node_work`). A model exported with dynamic
axes (batch, time, image size) has no static output shapes, and counting from those
priced every node at 0: on a voice-activity detector the recipe raised its STFT Conv,
"0.00% of the work", and the model ran 3x slower.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx
import onnx_ir as ir

from qconvert.calibration.reducing import run_shapes
from qconvert.dataset import Feeds
from qconvert.plan import QuantPlan
from qconvert.runtime import make_session


@dataclass(frozen=True, slots=True, kw_only=True)
class RaiseCost:
    """The float work a set of raised nodes brings, as a share of the model's."""

    work_share: float
    """Multiply-accumulates newly on float kernels / the model's multiply-accumulates."""
    made_float: tuple[str, ...]
    """The nodes the base plan quantizes and this one does not, in plan order: the raised
    nodes and what the plan makes float with them."""


def node_work(model: ir.Model, feeds: Feeds | None) -> dict[str, float]:
    """Multiply-accumulates of one run of each main-graph node, on inputs shaped as `feeds`.

    Conv, ConvTranspose, MatMul and Gemm count their multiply-accumulates; other ops their
    output elements. Shapes come from shape inference on `feeds`' shapes, else from a
    run on `feeds` (`_shapes_in_a_run`), else from the model's static shapes; a node
    whose output shape is unknown every way counts 0.
    """
    values = [
        value
        for node in model.graph
        for value in (*node.inputs, *node.outputs)
        if value is not None and value.name
    ]
    seen: dict[str, tuple[int, ...]] = {}

    def shape_of(value: ir.Value | None) -> tuple[int, ...] | None:
        if value is None:
            return None
        if value.name in seen:
            return seen[value.name]
        shape = value.shape
        if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
            return None
        return tuple(shape)

    if feeds:
        shapes = {name: tuple(array.shape) for name, array in feeds.items()}
        proto = ir.serde.serialize_model(model)
        seen.update(run_shapes(proto, {value.name for value in values}, shapes))
        unknown = sorted(
            {
                value.name
                for value in values
                if shape_of(value) is None
                and value.producer() is not None
                and isinstance(value.type, ir.TensorType | None)
            }
        )
        if unknown:
            seen.update(_shapes_in_a_run(proto, unknown, feeds))
    return {node.name or "": _macs(node, shape_of) for node in model.graph}


def _shapes_in_a_run(
    proto: onnx.ModelProto, names: Sequence[str], feeds: Feeds
) -> dict[str, tuple[int, ...]]:
    """The shapes of `names` in one float run on `feeds`: those shape inference cannot tell.

    A shape that depends on the data (a Pad or Reshape computed from the input's length,
    as an STFT front end writes them) is read from a run. Each tensor gets a Shape node
    and only the shapes leave the run, so onnxruntime frees the tensors as a plain run
    does. A run that fails tells nothing: {}.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.graph.output[:]
    taken = {value for node in probe.graph.node for value in node.output}
    outputs = []
    for index, name in enumerate(names):
        output = f"{name}::shape{index}"
        if output in taken:
            continue
        probe.graph.node.append(onnx.helper.make_node("Shape", [name], [output]))
        probe.graph.output.append(
            onnx.helper.make_tensor_value_info(output, onnx.TensorProto.INT64, [None])
        )
        outputs.append((name, output))
    try:
        session = make_session(probe.SerializeToString(), quiet=True)
        found = session.run([output for _, output in outputs], dict(feeds))
    except Exception:  # noqa: BLE001 -- onnxruntime raises several kinds; costs are a hint
        return {}
    return {
        name: tuple(int(d) for d in shape)
        for (name, _), shape in zip(outputs, found, strict=True)
    }


def raise_cost(base: QuantPlan, plan: QuantPlan, work: Mapping[str, float]) -> RaiseCost:
    """The cost of `plan` (with nodes raised) over `base` (the plan it was raised from)."""
    quantized = {node.name for node in base.nodes if node.quantized}
    made_float = tuple(
        node.name for node in plan.nodes if not node.quantized and node.name in quantized
    )
    total = sum(work.values())
    share = sum(work.get(name, 0.0) for name in made_float) / total if total else 0.0
    return RaiseCost(work_share=share, made_float=made_float)


def work_shares(work: Mapping[str, float], names: Sequence[str]) -> dict[str, float]:
    """Each named node's own share of the model's multiply-accumulates."""
    total = sum(work.values())
    return {name: work.get(name, 0.0) / total if total else 0.0 for name in names}


def weight_shares(model: ir.Model, names: Sequence[str]) -> dict[str, float]:
    """Each named node's constant inputs (after the first), as a share of all nodes'."""
    stored = {
        node.name or "": float(
            sum(
                value.const_value.nbytes
                for value in node.inputs[1:]
                if value is not None and value.const_value is not None
            )
        )
        for node in model.graph
    }
    total = sum(stored.values())
    return {name: stored.get(name, 0.0) / total if total else 0.0 for name in names}


def _macs(node: ir.Node, shape_of) -> float:
    """Multiply-accumulates of one run of the node (output elements for other ops)."""
    shape = shape_of(node.outputs[0]) if node.outputs else None
    if shape is None:
        return 0.0
    elements = float(math.prod(shape))
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    wshape = shape_of(weight)
    if wshape is None or not wshape:
        return elements
    if node.op_type == "Conv":
        return elements * float(math.prod(wshape[1:]))
    if node.op_type == "ConvTranspose":
        return elements * wshape[0] * float(math.prod(wshape[2:])) / max(wshape[1], 1)
    if node.op_type in ("MatMul", "Gemm") and len(wshape) >= 2:
        transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
        return elements * wshape[-1 if transposed else -2]
    return elements
