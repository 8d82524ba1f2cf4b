"""Tensors `quantize --data` need not calibrate, and the check that the plan agrees.

Calibration reads every tensor it records with a node of its own (`reducing`), and
onnxruntime fuses only around tensors no other node reads. A Conv whose output only a Relu
or Clip reads is then two kernels, not one fused Conv+activation: on a small depthwise
classifier (145 calibrated tensors, 24 of them such Conv outputs) a calibration run took
2.4x a float run where 1.5x is the bound.

Only a Relu's input is left out, not a Clip's. Measured on the calibration stage of two
224x224 depthwise CNNs whose clamps are Clip(0, 6): leaving out the Clips' inputs raised
its peak by 55-70 MB (183 -> 240-255 MB and 197-205 -> 260-264 MB, over the bound of
twice a float pass's) and saved no time, where leaving out the Relus' inputs of an
18-layer residual CNN saved 15 MB (362 -> 347) and 7-10% of the time.

Why (onnxruntime 1.32; its profiler, and thread CPU time on the inverted-residual CNN,
one thread): with the Clips' inputs read, each Conv's output goes to a plain Clip, which
the blocked (NCHWc) layout lacks, so it is reordered out and the Clip's output back in,
and the reductions read the reordered tensor while it is fresh (11.2 ms a run against
7.6 for the float model). With them left out, Conv and Clip fuse and nothing is
reordered in, but the reorders out that the reductions now need are nodes the layout
pass adds last, with the highest indices, and onnxruntime's priority order runs the
ready node of lowest index first: every one of them ran after the whole network, each
activation held until then and read back cold (13.0-13.7 ms a run, and the peak above).
The default order is no better (14.8 ms), and reading the Clips' outputs through
GlobalMaxPool, which stays blocked, cost 10.2 ms for the maxima alone. So when a
tensor's reorder runs matters more than which tensor is read, and the graph cannot set
it.

The plan reads such a tensor only where the clamp after it cannot be absorbed into the
quantization of the clamp's output (`plan.activations._plan_output`): where the clamp is
excluded, or a symmetric scheme's zero point cannot perform it. Both are known before
calibrating, so `quantize --data` calibrates without the others (`deferrable_tensors`).
Every plan is made through a `RecordingRanges` that notes each lookup of one of them, in
case some other rule reads one: such a plan would differ from the plan of a full
calibration, so `DeferredTensorsNeeded` stops the run and `quantize` runs again
calibrating every tensor. The plan is always the one a full calibration gives, and only a
run that needs them pays twice.

`qconvert calibrate` keeps calibrating every tensor: its file serves every exclusion.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import onnx_ir as ir

DEFERRED_CLAMPS = frozenset({"Relu"})
"""The clamps whose input calibration leaves out (not Clip: see the module's docstring)."""


def deferrable_tensors(
    model: ir.Model,
    tensor_names: tuple[str, ...],
    clamp_kept: Callable[[ir.Node], bool] = lambda node: True,
) -> frozenset[str]:
    """Those of `tensor_names` whose only reader is a Relu of the main graph.

    Neither the tensor nor the clamp's output may be a graph output (the plan quantizes
    a graph output's producer differently), and the clamp's output must be calibrated
    itself: it is what the plan quantizes in the tensor's place. `clamp_kept` says
    whether the plan may absorb a clamp (false where the options keep it float).
    """
    wanted = set(tensor_names)
    deferred = set()
    for node in model.graph:
        if node.op_type not in DEFERRED_CLAMPS or not node.inputs or node.inputs[0] is None:
            continue
        value, clamped = node.inputs[0], node.outputs[0]
        consumers = value.consumers()
        if (
            value.name in wanted
            and clamped.name in wanted
            and len(consumers) == 1
            and value.producer() is not None
            and not value.is_graph_output()
            and not clamped.is_graph_output()
            and clamp_kept(node)
        ):
            deferred.add(value.name)
    return frozenset(deferred)


class DeferredTensorsNeeded(Exception):
    """A plan looked up the range of a tensor calibration deferred: calibrate them all.

    Attributes:
        names: the deferred tensors it looked up.
    """

    def __init__(self, names: frozenset[str]) -> None:
        super().__init__(", ".join(sorted(names)))
        self.names = names


class RecordingRanges(Mapping[str, Any]):
    """`ranges`, noting every lookup of a name in `deferred` (which it lacks).

    The planner asks `name in ranges` and `ranges.get(name)`; both come here, so after a
    plan `check` tells whether it depended on a deferred tensor.
    """

    def __init__(self, ranges: Mapping[str, Any], deferred: frozenset[str]) -> None:
        self._ranges = ranges
        self._deferred = deferred
        self.missed: set[str] = set()

    def __getitem__(self, name: str) -> Any:
        if name in self._deferred and name not in self._ranges:
            self.missed.add(name)
        return self._ranges[name]

    def __contains__(self, name: object) -> bool:
        if name in self._deferred and name not in self._ranges:
            self.missed.add(name)  # type: ignore[arg-type]
            return False
        return name in self._ranges

    def __iter__(self) -> Iterator[str]:
        return iter(self._ranges)

    def __len__(self) -> int:
        return len(self._ranges)

    def check(self) -> None:
        """Raises `DeferredTensorsNeeded` if a deferred tensor was looked up."""
        if self.missed:
            raise DeferredTensorsNeeded(frozenset(self.missed))


def watched(ranges: Mapping[str, Any], deferred: frozenset[str]) -> Mapping[str, Any]:
    """`ranges` as a `RecordingRanges` when tensors were deferred, else unchanged."""
    return RecordingRanges(ranges, deferred) if deferred else ranges
