"""The parts of a graph output that a Concat assembles, so each is scored alone.

A detector's head writes one tensor from parts on unrelated scales: an anchor-free head
concatenates box coordinates in pixels (0 to 320) with class probabilities (0 to 1) along
axis 1. The SQNR of the whole tensor is the SQNR of its boxes, whose energy is 10^5 times
the classes': on a 320x320 detector of that kind the default int8 model scores 29.8 dB on the
whole output, its boxes 29.8 dB and its class probabilities 10.7 dB, and the class
probabilities are what decides a detection (detection F1 73.8% against the float model). A
score on the whole output calls that model good. Scoring each part alone and counting the
worst sees the loss; a part on the same scale as the others changes nothing.

A part a Sigmoid writes is scored by its logits, less the float model's mean. Probabilities
squash every score far from the boundary to 0 or 1: on photos with nothing to detect the
class part is ~1e-4 everywhere, and its SQNR is noise (the detector above read 0.9 dB
with the default int8 model and -1.3 dB with a better one on calibration photos, while on
the eval photos it went 10.7 -> 8.7 dB for the same pair, and the class logits said 11.3
-> 12.7 dB and 12.5 -> 12.8 dB). The logits carry the same network error on any photo: on
32 calibration photos without detections they read 11.3, 12.7 and 21.8 dB for three
models whose eval photos read 12.5, 12.8 and 22.0 dB. Their mean (about -8, a constant
offset of every anchor) is no signal: scored with it, the same three read 32.7, 34.1
and 43.2 dB, all above the recipe's floor.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qconvert import ops

PROBABILITY_FLOOR = 1e-6
"""Probabilities are read as at least this (and at most 1 less it) before their logits
are taken: a quantized Sigmoid writes exact zeros, and no decision tells 1e-6 from 0."""


@dataclass(frozen=True, slots=True)
class Parts:
    """How a Concat assembles an output.

    Its axis, each input's extent along it, and which inputs a Sigmoid writes (scored as
    logits, see the module doc; empty: none).
    """

    axis: int
    sizes: tuple[int, ...]
    sigmoid: tuple[bool, ...] = ()

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

    def pairs(
        self, reference: np.ndarray, candidate: np.ndarray
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """(reference, candidate) for each part, as they are scored.

        A part a Sigmoid writes gives its logits, both less the mean of the reference's.
        """
        pairs = list(zip(self.split(reference), self.split(candidate), strict=True))
        if len(pairs) != len(self.sizes):
            return pairs  # the extent did not match: whole arrays, as written
        scored = []
        for (ref, cand), sigmoid in zip(
            pairs, self.sigmoid or (False,) * len(pairs), strict=True
        ):
            if sigmoid:
                ref, cand = _logit(ref), _logit(cand)
                mean = ref.mean()
                ref, cand = ref - mean, cand - mean
            scored.append((ref, cand))
        return scored


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
        sizes, sigmoid = [], []
        for value in node.inputs:
            shape = value.shape if value is not None else None
            if shape is None or not -len(shape) <= axis < len(shape):
                break
            extent = shape[axis]
            if not isinstance(extent, int) or extent <= 0:
                break
            sizes.append(extent)
            sigmoid.append(_written_by_sigmoid(value))
        else:
            found[output.name] = Parts(axis=axis, sizes=tuple(sizes), sigmoid=tuple(sigmoid))
    return found


def _written_by_sigmoid(value: ir.Value) -> bool:
    """Whether a Sigmoid writes `value`, maybe through Reshape, Transpose and the like."""
    while (producer := value.producer()) is not None:
        if producer.op_type == "Sigmoid":
            return True
        if producer.op_type not in ops.PASS_THROUGH or not producer.inputs:
            return False
        value = producer.inputs[0]
    return False


def _logit(probabilities: np.ndarray) -> np.ndarray:
    p = np.clip(
        np.asarray(probabilities, dtype=np.float64), PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR
    )
    return np.log(p) - np.log1p(-p)
