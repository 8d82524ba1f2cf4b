"""The calibration graph: the model with each calibrated tensor reduced where it is made.

Exposing a tensor as a graph output keeps it alive, and copied out, until the run ends:
with every calibrated tensor exposed, one run holds every activation of the model at once
(a few hundred MB on a 224x224 CNN) and Python then reads each of them again. Instead,
right after the node that computes a tensor, a few nodes reduce it inside onnxruntime:

    min  = ReduceMin(t)          max = ReduceMax(t)          size = Size(t)
    some = Slice(Reshape(t, [-1]), 0, end, axis 0, Gather(steps, i))  (histogram's subset)

and, for each float output of the model, sum = ReduceSum(output) (finite exactly when no
value is NaN or infinite).

Only these small outputs leave the run, so onnxruntime frees each activation once its
readers are done, as in a plain float pass, and its memory pattern stays the float pass's.
`step` is read from one graph input, a vector with a stride per tensor (one feed, not one
per tensor: onnxruntime checks each feed of each run in Python): the collector feeds the
odd stride that keeps at most
`histogram_values` values a sample (`stride`), which depends only on the tensor's size in
one run, so a data set gives the same statistics however it is split.

An infinite value shows in the min or max; the collector then runs that batch again with
the raw tensor exposed and lets the observer sort the values (a mask written as -inf, a
model that overflows: `collect`). onnxruntime's ReduceMin and ReduceMax skip a NaN that is
not first (measured on 1.32), so a NaN is caught where it reaches the model's outputs: a
sum there that is not finite runs the batch again raw, and the observers name the first
tensor that holds it. (A sum on every tensor would catch a NaN that no output sees, for
a pass more over every activation: a sixth of a float pass on the bench's YOLOv8n; such a
NaN changes no range, as the reductions skip it.) Float16 and double tensors are cast to
float32 first: the cast is exact or monotone, as the observers' own.

The reduction nodes go right after the tensor's producer, so that onnxruntime's execution
order runs them while the tensor is fresh and its buffer can then be reused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qconvert.calibration.subgraphs import expose_body_tensors

MIN_OPSET = 10
"""Slice takes its step as an input from opset 10: older models are calibrated raw."""

_END = np.iinfo(np.int64).max
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}


@dataclass(frozen=True, slots=True)
class Reduction:
    """The names of the outputs (and the step input) that reduce one tensor."""

    tensor: str
    min: str
    max: str
    size: str
    some: str | None  # the histogram's subset (None: no histogram)


@dataclass(frozen=True, slots=True)
class ReducingGraph:
    """The calibration graph, serialized, and what it computes for each tensor."""

    data: bytes
    reductions: tuple[Reduction, ...]
    steps: str | None  # the graph input of the strides, one per reduction, in order
    checks: tuple[str, ...]  # the sums of the model's float outputs


def stride(size: int, budget: int) -> int:
    """The step of the histogram's subset of `size` values, at most `budget` of them.

    Every value when they fit; else an odd step, so it does not alias with power-of-two
    dims.
    """
    if size <= budget:
        return 1
    return -(-size // budget) | 1


def strides(sizes: np.ndarray, budget: int) -> np.ndarray:
    """`stride` of each of `sizes` (int64)."""
    return np.where(sizes <= budget, 1, (-(-sizes // max(budget, 1))) | 1).astype(np.int64)


def opset_of(proto: onnx.ModelProto) -> int:
    """The model's default-domain opset."""
    return next(
        (entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), 1
    )


def reducing_graph(
    proto: onnx.ModelProto,
    tensors: Iterable[str],
    dtypes: Mapping[str, int],
    *,
    histogram: bool,
) -> ReducingGraph:
    """`proto` (changed in place) with each of `tensors` reduced right after its producer.

    Tensors inside If/Loop/Scan bodies are first passed out of their holder (`subgraphs`).
    """
    tensors = tuple(tensors)
    expose_body_tensors(proto, tensors)
    graph = proto.graph
    originals = list(graph.output)
    taken = {value.name for value in (*graph.input, *graph.output, *graph.initializer)}
    taken.update(name for node in graph.node for name in (*node.input, *node.output))

    def fresh(name: str) -> str:
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    steps = fresh("qconvert_calibration/steps") if histogram else None
    if steps is not None:
        graph.input.append(
            helper.make_tensor_value_info(steps, onnx.TensorProto.INT64, [len(tensors)])
        )
    flat = fresh("qconvert_calibration/flat")
    zero = fresh("qconvert_calibration/zero")
    end = fresh("qconvert_calibration/end")
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([-1], np.int64), flat),
            numpy_helper.from_array(np.array([0], np.int64), zero),
            numpy_helper.from_array(np.array([_END], np.int64), end),
        ]
    )
    float32 = onnx.TensorProto.FLOAT
    after: dict[str, list[onnx.NodeProto]] = {}
    reductions = []
    for index, tensor in enumerate(tensors):
        prefix = f"qconvert_calibration/{index}/"
        nodes: list[onnx.NodeProto] = []
        source = tensor
        if dtypes.get(tensor, float32) != float32:
            source = fresh(prefix + "float")
            nodes.append(helper.make_node("Cast", [tensor], [source], to=float32))
        names = {kind: fresh(prefix + kind) for kind in ("min", "max", "size")}
        nodes += [
            helper.make_node("ReduceMin", [source], [names["min"]], keepdims=0),
            helper.make_node("ReduceMax", [source], [names["max"]], keepdims=0),
            helper.make_node("Size", [source], [names["size"]]),
        ]
        some = None
        if steps is not None:
            some, step, at, flattened = (
                fresh(prefix + k) for k in ("some", "step", "at", "flat")
            )
            graph.initializer.append(numpy_helper.from_array(np.array([index], np.int64), at))
            nodes += [
                helper.make_node("Gather", [steps, at], [step]),
                helper.make_node("Reshape", [source, flat], [flattened]),
                helper.make_node("Slice", [flattened, zero, end, zero, step], [some]),
            ]
        after.setdefault(tensor, []).extend(nodes)
        for name, dtype in (
            (names["min"], float32),
            (names["max"], float32),
            (names["size"], onnx.TensorProto.INT64),
            (some, float32),
        ):
            if name is not None:
                graph.output.append(helper.make_tensor_value_info(name, dtype, None))
        reductions.append(Reduction(tensor, **names, some=some))
    checks = []
    for output in originals:
        if output.type.tensor_type.elem_type not in _FLOATS:
            continue
        checked = output.name
        if output.type.tensor_type.elem_type != float32:
            checked = fresh(f"qconvert_calibration/check/{len(checks)}/float")
            after.setdefault(output.name, []).append(
                helper.make_node("Cast", [output.name], [checked], to=float32)
            )
        name = fresh(f"qconvert_calibration/check/{len(checks)}")
        after.setdefault(output.name, []).append(
            helper.make_node("ReduceSum", [checked], [name], keepdims=0)
        )
        checks.append(name)
    for name in checks:
        graph.output.append(helper.make_tensor_value_info(name, float32, None))
    ordered: list[onnx.NodeProto] = []
    for value in graph.input:
        ordered += after.pop(value.name, [])
    for node in graph.node:
        ordered.append(node)
        for name in node.output:
            ordered += after.pop(name, [])
    for nodes in after.values():  # tensors no node computes: left to the sort
        ordered += nodes
    del graph.node[:]
    graph.node.extend(ordered)
    return ReducingGraph(
        data=proto.SerializeToString(),
        reductions=tuple(reductions),
        steps=steps,
        checks=tuple(checks),
    )
