"""Calibrated tensors whose statistics follow exactly from another's: no node reads them.

Every tensor the calibration graph reads costs onnxruntime a node or six and, in a CNN,
the reorder of its blocked (NCHWc) layout to a plain one: measured on a small depthwise
classifier, one ReduceMax on each of its 145 tensors alone took a run from 0.81 to 1.59
ms. Some tensors need no reading of their own:

- The output of a Reshape, Flatten, Squeeze, Unsqueeze or Identity holds its input's
  values in the same order.
- The output of a Relu or a Clip with constant bounds is its input clamped, value by
  value, and clamping is monotone: min(clip(x)) = clip(min(x)), max likewise, and the
  strided subset the histogram takes of the output (same size, so same stride) is the
  clamped subset of the input. onnxruntime and numpy clamp alike (a -0.0 stays -0.0).

So where such a node's input is calibrated and read, its output is calibrated from the
input's reductions (`folding`): the same min, max, count and histogram, bit for bit, as a
read of its own gives. Only float32 tensors of the main graph, and only from a tensor
that is itself read (no chains), keep this exact and simple.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

SAME_VALUES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})
"""Ops whose output holds their first input's values in the same order."""


@dataclass(frozen=True, slots=True)
class Derived:
    """A tensor whose statistics are those of `source`, clamped to [low, high].

    Attributes:
        source: the calibrated tensor it is computed from.
        low, high: the clamp (-inf and inf for the ops that only reshape).
    """

    source: str
    low: float = -math.inf
    high: float = math.inf

    @property
    def clamped(self) -> bool:
        """Whether the values change at all (a Relu or Clip, not a reshape)."""
        return self.low != -math.inf or self.high != math.inf


def derived_tensors(
    proto: onnx.ModelProto, tensors: Iterable[str], dtypes: Mapping[str, int]
) -> dict[str, Derived]:
    """Those of `tensors` whose statistics follow from another of them (module docstring).

    `dtypes` is the element type of each tensor (an onnx TensorProto type).
    """
    wanted = set(tensors)
    constants = _scalar_constants(proto.graph)
    derived: dict[str, Derived] = {}
    for node in proto.graph.node:
        if not node.input or not node.output or node.domain not in ("", "ai.onnx"):
            continue
        source, output = node.input[0], node.output[0]
        if (
            source not in wanted
            or output not in wanted
            or source in derived
            or output in derived
            or source == output
            or dtypes.get(source) != onnx.TensorProto.FLOAT
            or dtypes.get(output) != onnx.TensorProto.FLOAT
        ):
            continue
        if node.op_type in SAME_VALUES:
            derived[output] = Derived(source)
        elif node.op_type == "Relu":
            derived[output] = Derived(source, low=0.0)
        elif node.op_type == "Clip":
            bounds = _clip_bounds(node, constants)
            if bounds is not None:
                derived[output] = Derived(source, *bounds)
    return derived


def _clip_bounds(
    node: onnx.NodeProto, constants: Mapping[str, float]
) -> tuple[float, float] | None:
    """A Clip's [low, high], or None when a bound is not a constant."""
    bounds = [-math.inf, math.inf]
    for attribute in node.attribute:  # opset 6 to 10
        if attribute.name in ("min", "max"):
            bounds[attribute.name == "max"] = float(np.float32(attribute.f))
    for index, name in enumerate(node.input[1:3]):  # opset 11 on
        if not name:
            continue
        if name not in constants:
            return None
        bounds[index] = constants[name]
    low, high = bounds
    return (low, high) if low <= high else None


def _scalar_constants(graph: onnx.GraphProto) -> dict[str, float]:
    """The float32 initializers and Constant outputs holding one value."""
    found: dict[str, float] = {}
    tensors = [(tensor.name, tensor) for tensor in graph.initializer]
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.type == onnx.AttributeProto.TENSOR:
                    tensors.append((node.output[0], attribute.t))
    inputs = {value.name for value in graph.input}  # a feed may override those
    for name, tensor in tensors:
        if (
            name not in inputs
            and tensor.data_type == onnx.TensorProto.FLOAT
            and math.prod(tensor.dims) == 1
            and tensor.data_location != onnx.TensorProto.EXTERNAL
        ):
            found[name] = float(numpy_helper.to_array(tensor).reshape(()))
    return found
