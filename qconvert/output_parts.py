"""The parts of a graph output that a Concat assembles, so each is scored alone.

A detector's head writes one tensor from parts on unrelated scales: an anchor-free head
concatenates box coordinates in pixels (0 to 320) with class probabilities (0 to 1) along
axis 1. The SQNR of the whole tensor is the SQNR of its boxes, whose energy is 10^5 times
the classes': on a 320x320 detector of that kind the default int8 model scores 29.8 dB on the
whole output, its boxes 29.8 dB and its class probabilities 10.7 dB, and the class
probabilities are what decides a detection (detection F1 73.8% against the float model). A
score on the whole output calls that model good. Scoring each part alone and counting the
worst sees the loss; a part on the same scale as the others changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir


@dataclass(frozen=True, slots=True)
class Parts:
    """How a Concat assembles an output: its axis and each input's extent along it."""

    axis: int
    sizes: tuple[int, ...]

    def split(self, array: np.ndarray) -> Iterator[np.ndarray]:
        """The parts of `array`; the whole array when its extent does not match."""
        array = np.asarray(array)
        if not -array.ndim <= self.axis < array.ndim or array.shape[self.axis] != sum(
            self.sizes
        ):
            yield array
            return
        bounds = np.cumsum(self.sizes)[:-1]
        yield from np.split(array, bounds, axis=self.axis)


def concat_parts(model: ir.Model) -> dict[str, Parts]:
    """The graph outputs a Concat writes from inputs of known extent along its axis.

    The extents come from the shapes the model declares (prepare's shape inference): a
    dynamic batch or length elsewhere does not matter, only the extent along the axis.
    An output whose parts cannot all be sized is left whole.
    """
    found = {}
    for output in model.graph.outputs:
        node = output.producer()
        if node is None or node.op_type != "Concat" or len(node.inputs) < 2:
            continue
        axis = node.attributes.get_int("axis", 0)
        sizes = []
        for value in node.inputs:
            shape = value.shape if value is not None else None
            if shape is None or not -len(shape) <= axis < len(shape):
                break
            extent = shape[axis]
            if not isinstance(extent, int) or extent <= 0:
                break
            sizes.append(extent)
        else:
            found[output.name] = Parts(axis=axis, sizes=tuple(sizes))
    return found
