"""Tensors inside If/Loop/Scan bodies, passed out of their holder so calibration sees them.

onnxruntime returns only main-graph values. For calibration, the serialized model is
changed so that each wanted tensor of a body also leaves the node that holds the body:

- If: each branch gets one more output per wanted tensor of either branch: the tensor in
  its own branch, an empty float tensor in the other. The branch not taken computes
  nothing, and an empty array adds nothing to the statistics.
- Loop and Scan: the body gets one more scan output per wanted tensor (its inputs too:
  the values carried from one iteration to the next), which the holder stacks over the
  iterations: the statistics see every iteration. (A tensor whose shape
  changes from one iteration to the next cannot be stacked; onnxruntime then refuses the
  run, and calibration goes on without the body tensors, see `collect`.)

The tensor is renamed inside its body and the holder's new output takes its name, so the
statistics are keyed by the name the plan knows. Holders of the main graph are handled; a
holder nested in a body keeps its own body's tensors to itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qconvert.graph_utils import HOLDERS

_SUFFIX = "__in_body"
_OUT = "__out_of_body"


def expose_body_tensors(proto: onnx.ModelProto, names: Iterable[str]) -> None:
    """Makes each named body tensor of `proto` an output of its holder, in place.

    Names of main-graph values, and of tensors no holder's body computes, are left alone.
    """
    wanted = set(names)
    for holder in proto.graph.node:
        if holder.op_type not in HOLDERS or holder.domain not in ("", "ai.onnx"):
            continue
        graph = onnx.AttributeProto.GRAPH
        bodies = {a.name: a.g for a in holder.attribute if a.type == graph}
        for body_name, body in bodies.items():
            for name, elem_type in _computed(body, wanted):
                _rename(body, name, name + _SUFFIX)
                # Through an Identity: a value the body already returns cannot be returned
                # twice (onnxruntime hands it to the first output only).
                body.node.append(helper.make_node("Identity", [name + _SUFFIX], [name + _OUT]))
                body.output.append(helper.make_tensor_value_info(name + _OUT, elem_type, None))
                if holder.op_type == "If":
                    other = "else_branch" if body_name == "then_branch" else "then_branch"
                    _append_empty(bodies[other], f"{name}__empty", elem_type)
                holder.output.append(name)
        _extend_scan_attributes(holder)


def _computed(body: onnx.GraphProto, wanted: set[str]) -> Iterator[tuple[str, int]]:
    """(name, element type) of the wanted tensors the body defines.

    Its inputs (a Loop's carried values, Scan's slices) and what its own nodes compute.
    """
    types = {
        info.name: info.type.tensor_type.elem_type
        for info in (*body.value_info, *body.output, *body.input)
    }
    names = [info.name for info in body.input]
    for node in body.node:
        if node.op_type not in HOLDERS:
            names += node.output
    for name in names:
        if name in wanted:
            yield name, types.get(name) or onnx.TensorProto.FLOAT


def _rename(body: onnx.GraphProto, old: str, new: str) -> None:
    """Renames a value of `body` wherever the body, or a body nested in it, names it."""
    for node in body.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _rename(attribute.g, old, new)
    for info in (*body.input, *body.output, *body.value_info):
        if info.name == old:
            info.name = new


def _append_empty(branch: onnx.GraphProto, name: str, elem_type: int) -> None:
    """Ends `branch` with an output `name`: an empty tensor of the element type."""
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    empty = numpy_helper.from_array(np.zeros((0,), dtype=dtype))
    branch.node.append(helper.make_node("Constant", [], [name], value=empty))
    branch.output.append(helper.make_tensor_value_info(name, elem_type, None))


def _extend_scan_attributes(holder: onnx.NodeProto) -> None:
    """Gives Scan's new scan outputs the default axis and direction (0, forward)."""
    if holder.op_type != "Scan":
        return
    body = next(a.g for a in holder.attribute if a.name == "body")
    scan_inputs = next(a.i for a in holder.attribute if a.name == "num_scan_inputs")
    scan_outputs = len(body.output) - (len(body.input) - scan_inputs)
    for attribute in holder.attribute:
        if attribute.name in ("scan_output_axes", "scan_output_directions"):
            attribute.ints.extend([0] * (scan_outputs - len(attribute.ints)))
