"""The calibration graph: the model with each calibrated tensor reduced where it is made.

Exposing a tensor as a graph output keeps it alive, and copied out, until the run ends:
with every calibrated tensor exposed, one run holds every activation of the model at once
(a few hundred MB on a 224x224 CNN) and Python then reads each of them again. And each
output of a run costs Python a few microseconds, each node onnxruntime one or two: on a
small model that runs in 0.3 ms, four outputs and six nodes per tensor cost more than the
model itself. So a run returns a handful of vectors, whatever the number of tensors:

1. A large tensor (more than `WHOLE_VALUES` values in a run on the first batch's input
   shapes, or a size shape inference does not know) is reduced inside onnxruntime, right
   after the node that computes it:

       flat = Reshape(t, [-1])          (an alias: no copy)
       min  = ReduceMin(flat)           max = ReduceMax(flat)           size = Shape(flat)
       some = Slice(flat, 0, end, axis 0, step_i)   (the histogram's subset)

   and the mins, maxs, sizes and subsets of all of them are concatenated, one vector each.
2. A small tensor leaves whole: its flattened values and its size, concatenated with those
   of the other small tensors into one vector each. Its min, max and histogram subset are
   then taken in numpy for all of them at once (`collect`); a handful of nodes per tensor
   would cost more than reading the few values again. The values are those onnxruntime
   computed either way (the same kernels, see below), so the statistics are the same.
3. For each float output of the model, sum = ReduceSum(output) (finite exactly when no
   value is NaN or infinite).

Only these small outputs leave the run, so onnxruntime frees each large activation once its
readers are done, as in a plain float pass, and its memory pattern stays the float pass's
(the small tensors, `WHOLE_TOTAL` values a run at most, live until the run ends).
`step_i` is read from one graph input, a vector with a stride per reduced tensor (one feed,
not one per tensor: onnxruntime checks each feed of each run in Python) that one Split
cuts into one stride per tensor: the collector feeds the odd stride that keeps at most
`histogram_values` values a sample (`stride`), which depends only on the tensor's size in
one run, so a data set gives the same statistics however it is split.

Every calibrated tensor is read by a node added here, whichever way it leaves: onnxruntime
fuses only around tensors no other node reads, so the kernels that compute a tensor, and
its values, do not depend on which way it was sorted.

An infinite value shows in the min or max; the collector then runs that batch again with
the raw tensor exposed and lets the observer sort the values (a mask written as -inf, a
model that overflows: `collect`). onnxruntime's ReduceMin and ReduceMax skip a NaN that is
not first (measured on 1.32), so a NaN is caught where it reaches the model's outputs: a
sum there that is not finite runs the batch again raw, and the observers name the first
tensor that holds it. (A sum on every tensor would catch a NaN that no output sees, for
a pass more over every activation: a sixth of a float pass on a 320x320 detector; such a
NaN changes no range, as the reductions skip it.) Float16 and double tensors are cast to
float32 first: the cast is exact or monotone, as the observers' own.

The reduction nodes go right after the tensor's producer, so that onnxruntime's execution
order runs them while the tensor is fresh and its buffer can then be reused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qconvert.calibration.subgraphs import expose_body_tensors

MIN_OPSET = 10
"""Slice takes its step as an input from opset 10: older models are calibrated raw."""

WHOLE_VALUES = 4096
"""Tensors of at most this many values in a run leave a run whole (measured on the bench's
small models: below this, the six reduction nodes of a tensor cost onnxruntime more than
copying its values out costs numpy)."""

WHOLE_TOTAL = 1 << 20
"""At most this many values in a run leave a run whole, all tensors together (4 MB): they
live until the run ends."""

_SHAPE_VALUES = 64  # initializers at most this large stay in shape inference's graph
_END = np.iinfo(np.int64).max
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}


@dataclass(frozen=True, slots=True)
class ReducingGraph:
    """The calibration graph, serialized, and the outputs a run of it returns.

    Attributes:
        data: the serialized graph.
        reduced: the tensors reduced inside the graph, in the order of `mins`, `maxs`,
            `sizes` and `somes`.
        whole: the tensors that leave whole, in the order of `values` and `lengths`.
        mins, maxs, sizes: per reduced tensor, its min, max and number of values (None
            when no tensor is reduced).
        somes: the histogram's subsets of the reduced tensors, one after the other (None:
            no histogram, or no reduced tensor).
        values, lengths: the values of the whole tensors, one after the other, and how
            many each has (None when no tensor leaves whole).
        steps: the graph input of the strides, one per reduced tensor, in order.
        checks: the sums of the model's float outputs.
    """

    data: bytes
    reduced: tuple[str, ...]
    whole: tuple[str, ...]
    mins: str | None
    maxs: str | None
    sizes: str | None
    somes: str | None
    values: str | None
    lengths: str | None
    steps: str | None
    checks: tuple[str, ...]

    @property
    def outputs(self) -> tuple[str, ...]:
        """Every output a run fetches: the vectors above that exist, then the checks."""
        vectors = (self.mins, self.maxs, self.sizes, self.somes, self.values, self.lengths)
        return (*(name for name in vectors if name is not None), *self.checks)


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


def run_sizes(
    proto: onnx.ModelProto, tensors: Iterable[str], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, int]:
    """The values each of `tensors` holds in a run on inputs of these `shapes`.

    Their product of `run_shapes`; absent where shape inference cannot tell.
    """
    return {
        name: math.prod(shape) for name, shape in run_shapes(proto, tensors, shapes).items()
    }


def run_shapes(
    proto: onnx.ModelProto, tensors: Iterable[str], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """The shape of each of `tensors` in a run on inputs of these `shapes`.

    ONNX shape inference on the graph with its inputs set to `shapes` and its large
    initializers left as bare types (their values only slow it down); absent where it
    cannot tell (a shape that depends on the data). A failure tells nothing: {}.
    """
    graph = proto.graph
    light = onnx.ModelProto()
    light.ir_version = proto.ir_version
    light.opset_import.extend(proto.opset_import)
    light.functions.extend(proto.functions)
    light.graph.node.extend(graph.node)
    light.graph.output.extend(graph.output)
    for value in graph.input:
        typed = light.graph.input.add()
        typed.CopyFrom(value)
        shape = shapes.get(value.name)
        if shape is not None and typed.type.HasField("tensor_type"):
            typed.type.tensor_type.shape.Clear()
            for size in shape:
                typed.type.tensor_type.shape.dim.add().dim_value = size
    listed = {value.name for value in graph.input}  # old models list weights as inputs
    for tensor in graph.initializer:
        if math.prod(tensor.dims) <= _SHAPE_VALUES:  # shape arithmetic reads these
            light.graph.initializer.append(tensor)
        elif tensor.name not in listed:
            light.graph.input.append(
                helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            )
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception:  # noqa: BLE001 -- onnx raises several kinds; the sizes are a hint
        return {}
    graph = inferred.graph
    types = {
        value.name: value.type.tensor_type
        for value in (*graph.input, *graph.value_info, *graph.output)
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape")
    }
    known = {}
    for name in tensors:
        kind = types.get(name)
        dims = [] if kind is None else list(kind.shape.dim)
        if kind is not None and all(
            d.HasField("dim_value") and d.dim_value >= 0 for d in dims
        ):
            known[name] = tuple(d.dim_value for d in dims)
    return known


def whole_tensors(
    sizes: Mapping[str, int], *, most: int | None = None, total: int | None = None
) -> tuple[str, ...]:
    """The tensors of `sizes` (values in a run, `run_sizes`) that leave a run whole.

    At most `most` values each (`WHOLE_VALUES`), smallest first while the sum stays
    within `total` (`WHOLE_TOTAL`); in order of size.
    """
    most = WHOLE_VALUES if most is None else most
    total = WHOLE_TOTAL if total is None else total
    chosen: list[str] = []
    spent = 0
    for name, size in sorted(sizes.items(), key=lambda item: (item[1], item[0])):
        if size > most or spent + size > total:
            break
        chosen.append(name)
        spent += size
    return tuple(chosen)


def reducing_graph(
    proto: onnx.ModelProto,
    tensors: Iterable[str],
    dtypes: Mapping[str, int],
    *,
    histogram: bool,
    whole: Iterable[str] = (),
) -> ReducingGraph:
    """`proto` (changed in place) with each of `tensors` reduced right after its producer.

    Those also in `whole` leave the run whole instead (`whole_tensors` picks them), in
    that order.
    Tensors inside If/Loop/Scan bodies are first passed out of their holder (`subgraphs`).
    """
    tensors = tuple(tensors)
    whole = tuple(dict.fromkeys(name for name in whole if name in frozenset(tensors)))
    reduced = tuple(name for name in tensors if name not in frozenset(whole))
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

    steps = fresh("qconvert_calibration/steps") if histogram and reduced else None
    after: dict[str, list[onnx.NodeProto]] = {}
    step_of: list[str] = []
    if steps is not None:
        graph.input.append(
            helper.make_tensor_value_info(steps, onnx.TensorProto.INT64, [len(reduced)])
        )
        # One Split hands each tensor its stride: a Gather a tensor (and an index
        # initializer each) made the graph onnxruntime optimizes that much larger.
        step_of = [
            fresh(f"qconvert_calibration/{index}/step") for index in range(len(reduced))
        ]
        # From opset 18 an even Split names its number of outputs.
        counted = {"num_outputs": len(reduced)} if opset_of(proto) >= 18 else {}
        after[steps] = [helper.make_node("Split", [steps], step_of, axis=0, **counted)]
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
    # Per output vector, the per-tensor parts it concatenates.
    parts: dict[str, list[str]] = {kind: [] for kind in ("min", "max", "size", "some")}
    parts |= {"values": [], "lengths": []}

    def flattened(tensor: str, prefix: str) -> str:
        """`tensor` as float32 and one dim, by nodes queued right after its producer."""
        source = tensor
        if dtypes.get(tensor, float32) != float32:
            source = fresh(prefix + "float")
            after.setdefault(tensor, []).append(
                helper.make_node("Cast", [tensor], [source], to=float32)
            )
        name = fresh(prefix + "flat")
        after.setdefault(tensor, []).append(
            helper.make_node("Reshape", [source, flat], [name])
        )
        return name

    for index, tensor in enumerate(reduced):
        prefix = f"qconvert_calibration/{index}/"
        values = flattened(tensor, prefix)
        names = {kind: fresh(prefix + kind) for kind in ("min", "max", "size")}
        nodes = [
            # keepdims: one value of shape [1], ready to be concatenated.
            helper.make_node("ReduceMin", [values], [names["min"]], keepdims=1),
            helper.make_node("ReduceMax", [values], [names["max"]], keepdims=1),
            helper.make_node("Shape", [values], [names["size"]]),
        ]
        if steps is not None:
            names["some"] = fresh(prefix + "some")
            nodes.append(
                helper.make_node(
                    "Slice", [values, zero, end, zero, step_of[index]], [names["some"]]
                )
            )
        after[tensor].extend(nodes)
        for kind, name in names.items():
            parts[kind].append(name)
    for index, tensor in enumerate(whole):
        prefix = f"qconvert_calibration/whole/{index}/"
        values = flattened(tensor, prefix)
        length = fresh(prefix + "length")
        after[tensor].append(helper.make_node("Shape", [values], [length]))
        parts["values"].append(values)
        parts["lengths"].append(length)
    vectors: dict[str, str | None] = {}
    concatenated: list[onnx.NodeProto] = []
    for kind, names in parts.items():
        if not names:
            vectors[kind] = None
            continue
        vectors[kind] = fresh(f"qconvert_calibration/{kind}")
        concatenated.append(helper.make_node("Concat", names, [vectors[kind]], axis=0))
        dtype = onnx.TensorProto.INT64 if kind in ("size", "lengths") else float32
        graph.output.append(helper.make_tensor_value_info(vectors[kind], dtype, None))
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
    graph.node.extend([*ordered, *concatenated])
    return ReducingGraph(
        data=proto.SerializeToString(),
        reduced=reduced,
        whole=whole,
        mins=vectors["min"],
        maxs=vectors["max"],
        sizes=vectors["size"],
        somes=vectors["some"],
        values=vectors["values"],
        lengths=vectors["lengths"],
        steps=steps,
        checks=tuple(checks),
    )
