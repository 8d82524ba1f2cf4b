"""What one run of the calibration graph returns, per tensor, and its folding into observers.

A run of the calibration graph (`reducing`) returns a handful of vectors whatever the
number of tensors: the mins, maxs, sizes and histogram subsets of the tensors reduced
inside onnxruntime, and the values of the small tensors that leave whole. `RunReader`
turns them into one entry per calibrated tensor with a few numpy calls, none per tensor:
the min and max of the whole tensors by `np.minimum.reduceat` over their segments, their
histogram subsets by one gather (the same strided subset the graph takes of a reduced
tensor, `reducing.stride`).

`Folder` gathers the runs and hands the observers one update per tensor every few runs:
the runs of one input signature share a layout, so their subsets stack into one matrix
and each tensor's values over all of them are one slice of it. The observers merge
exactly, so the grouping does not change the statistics.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from qconvert.calibration import reducing
from qconvert.calibration.derived import Derived
from qconvert.calibration.observers import TensorObserver

_EMPTY = np.zeros(0, np.float32)
_LAYOUTS = 64  # histogram layouts kept; more only with sizes that depend on the data


@dataclass(frozen=True, slots=True, eq=False)
class Layout:
    """Where each tensor's histogram subset lies in a run's outputs.

    Attributes:
        source: per tensor, 0 for the reduced subsets (`Run.somes`), 1 for the subsets of
            the whole tensors (`Run.subset`).
        start: per tensor, the first of its values there.
        count: per tensor, how many values it has there.
        gather: the indices of the whole tensors' subsets in their values (None: every
            value, all strides being 1).
        starts: per tensor, the first of its values in `Run.values` (whole tensors only).
        slots: per tensor, (source, start, stop) as Python ints, for `Folder.flush`.
        segments: the non-empty whole tensors, as their positions and their starts in
            `Run.values` (None when there is none).
        clamps: per tensor, the [low, high] its subset is clamped to (a tensor derived
            from a Relu's or Clip's input, `derived`), else None.
        steps_fit: whether the strides fed are those of these sizes (`reducing.strides`):
            known once per layout, not checked again every run.
    """

    source: np.ndarray
    start: np.ndarray
    count: np.ndarray
    gather: np.ndarray | None
    starts: np.ndarray
    slots: tuple[tuple[int, int, int], ...]
    segments: tuple[np.ndarray, np.ndarray] | None
    clamps: tuple[tuple[np.float32, np.float32] | None, ...]
    steps_fit: bool


@dataclass(frozen=True, slots=True)
class Run:
    """The reductions of one run, one entry per calibrated tensor.

    Attributes:
        mins, maxs: float32, NaN or infinite where the values were not all finite.
        sizes: int64, the number of values.
        somes: the reduced tensors' histogram subsets, one after the other.
        values: the whole tensors' values, one after the other.
        subset: the whole tensors' histogram subsets, one after the other.
        layout: where each tensor's subset lies in `somes` and `subset`.
        checks: the sums of the model's float outputs.
    """

    mins: np.ndarray
    maxs: np.ndarray
    sizes: np.ndarray
    somes: np.ndarray
    values: np.ndarray
    subset: np.ndarray
    layout: Layout
    checks: np.ndarray


class RunReader:
    """Reads the outputs of a run of one calibration graph into a `Run`.

    The tensors in `derived` are not in the graph: each takes its source's entries,
    clamped (`derived`), which a read of its own would give bit for bit.
    """

    def __init__(
        self,
        graph: reducing.ReducingGraph,
        tensors: tuple[str, ...],
        derived: Mapping[str, Derived] | None = None,
    ) -> None:
        position = {name: index for index, name in enumerate(tensors)}
        derived = derived or {}
        self.graph = graph
        self.outputs = graph.outputs  # a property that builds its tuple: read once
        self.count = len(tensors)
        self.reduced_at = np.array([position[n] for n in graph.reduced], np.intp)
        self.whole_at = np.array([position[n] for n in graph.whole], np.intp)
        self.whole = np.zeros(self.count, bool)
        self.whole[self.whole_at] = True
        self.derived_at = np.array([position[n] for n in derived], np.intp)
        self.derived_from = np.array([position[d.source] for d in derived.values()], np.intp)
        self.lows = np.array([d.low for d in derived.values()], np.float32)
        self.highs = np.array([d.high for d in derived.values()], np.float32)
        clamps: list[tuple[np.float32, np.float32] | None] = [None] * self.count
        for name, entry in derived.items():
            if entry.clamped:
                clamps[position[name]] = (np.float32(entry.low), np.float32(entry.high))
        self.clamps = tuple(clamps)
        self.layouts: dict[tuple, Layout] = {}

    def read(self, outputs: list[np.ndarray], steps: np.ndarray | None, budget: int) -> Run:
        """The run whose outputs (in `graph.outputs` order) are `outputs`.

        `steps` are the strides fed to the reduced tensors' subsets; `budget` is the most
        values a tensor's histogram takes in this run (`reducing.stride`).
        """
        named = dict(zip(self.outputs, outputs, strict=True))
        graph = self.graph
        mins = np.full(self.count, np.inf, np.float32)
        maxs = np.full(self.count, -np.inf, np.float32)
        sizes = np.zeros(self.count, np.int64)
        somes = named[graph.somes] if graph.somes is not None else _EMPTY
        if graph.reduced:
            mins[self.reduced_at] = named[graph.mins]
            maxs[self.reduced_at] = named[graph.maxs]
            sizes[self.reduced_at] = named[graph.sizes]
        values = _EMPTY
        if graph.whole:
            values = named[graph.values]
            sizes[self.whole_at] = named[graph.lengths]
        layout = self._layout(sizes, steps, budget)
        if layout.segments is not None:
            # The whole tensors lie one after the other: each non-empty one is a segment
            # of `values` from its start to the next one's, reduced in one call for all.
            at, starts = layout.segments
            mins[at] = np.minimum.reduceat(values, starts)
            maxs[at] = np.maximum.reduceat(values, starts)
        if self.derived_at.size:
            # Clamping is monotone: the clamped min and max are those of the clamped values.
            source = self.derived_from
            # (np.clip's wrapper costs more than these two ufuncs on a few values.)
            mins[self.derived_at] = np.minimum(np.maximum(mins[source], self.lows), self.highs)
            maxs[self.derived_at] = np.minimum(np.maximum(maxs[source], self.lows), self.highs)
            sizes[self.derived_at] = sizes[source]
        subset = values if layout.gather is None else values[layout.gather]
        checks = np.array([named[name] for name in graph.checks], np.float32).reshape(-1)
        return Run(mins, maxs, sizes, somes, values, subset, layout, checks)

    def _layout(self, sizes: np.ndarray, steps: np.ndarray | None, budget: int) -> Layout:
        key = (sizes.tobytes(), None if steps is None else steps.tobytes(), budget)
        layout = self.layouts.get(key)
        if layout is None:
            if len(self.layouts) >= _LAYOUTS:
                self.layouts.clear()
            layout = self.layouts[key] = self._new_layout(sizes, steps, budget)
        return layout

    def _new_layout(self, sizes: np.ndarray, steps: np.ndarray | None, budget: int) -> Layout:
        source = self.whole.astype(np.int8)
        start = np.zeros(self.count, np.int64)
        count = np.zeros(self.count, np.int64)
        if steps is not None and self.reduced_at.size:
            # Slice(flat, 0, end, step) keeps ceil(size / step) values.
            taken = -(-sizes[self.reduced_at] // steps)
            count[self.reduced_at] = taken
            start[self.reduced_at] = np.cumsum(taken) - taken
        gather = None
        starts = np.zeros(self.count, np.int64)
        segments = None
        if self.whole_at.size:
            lengths = sizes[self.whole_at]
            offsets = np.cumsum(lengths) - lengths
            starts[self.whole_at] = offsets
            filled = lengths > 0
            if filled.any():
                segments = (self.whole_at[filled], offsets[filled])
        if budget and self.whole_at.size:
            step = reducing.strides(lengths, budget)
            taken = -(-lengths // step)
            count[self.whole_at] = taken
            start[self.whole_at] = np.cumsum(taken) - taken
            if (step > 1).any():
                gather = np.concatenate(
                    [
                        np.arange(o, o + n, s)
                        for o, n, s in zip(offsets, lengths, step, strict=True)
                    ]
                )
        # A derived tensor's subset is its source's (same size, same stride), clamped.
        source[self.derived_at] = source[self.derived_from]
        start[self.derived_at] = start[self.derived_from]
        count[self.derived_at] = count[self.derived_from]
        slots = tuple(
            zip(source.tolist(), start.tolist(), (start + count).tolist(), strict=True)
        )
        steps_fit = steps is None or np.array_equal(
            steps, reducing.strides(sizes[self.reduced_at], budget)
        )
        return Layout(
            source, start, count, gather, starts, slots, segments, self.clamps, steps_fit
        )


class Folder:
    """The reductions of the last runs, until the observers take them (`flush`)."""

    def __init__(self, names: tuple[str, ...], observers: dict[str, TensorObserver]) -> None:
        self.names = names
        self.observers = observers
        self.runs: list[tuple[Run, np.ndarray]] = []
        self.bytes = 0

    def add(self, run: Run, kept: np.ndarray) -> None:
        """Gathers `run`'s reductions of the tensors `kept` says (the others ran raw).

        Only what the observers take is kept: not the whole tensors' values, whose subset
        is a copy once a stride passes over some (`values` held 38 MB over 64 runs of a
        small sample transformer).
        """
        # Built, not `dataclasses.replace`d: this runs once a run, and replace is slow.
        slim = Run(
            run.mins, run.maxs, run.sizes, run.somes, _EMPTY, run.subset, run.layout, _EMPTY
        )
        self.runs.append((slim, kept & (run.sizes > 0)))
        self.bytes += run.somes.nbytes + run.subset.nbytes

    def flush(self) -> None:
        """One observer update per tensor for all the runs gathered."""
        if not self.runs:
            return
        kept = np.stack([k for _, k in self.runs])
        lows = np.where(kept, np.stack([r.mins for r, _ in self.runs]), np.inf).min(axis=0)
        highs = np.where(kept, np.stack([r.maxs for r, _ in self.runs]), -np.inf).max(axis=0)
        counts = np.where(kept, np.stack([r.sizes for r, _ in self.runs]), 0).sum(axis=0)
        # Views into each run's subsets, one tensor at a time: a copy of all of them at
        # once (a matrix per layout) doubled the memory the fold holds.
        kept_by_tensor = kept.T.tolist()
        clamps = self.runs[0][0].layout.clamps
        for index in np.flatnonzero(counts).tolist():
            chunks = []
            for ok, (run, _) in zip(kept_by_tensor[index], self.runs, strict=True):
                source, start, stop = run.layout.slots[index]
                if ok and stop > start:
                    chunks.append((run.somes, run.subset)[source][start:stop])
            values = _EMPTY if not chunks else np.concatenate(chunks)
            if clamps[index] is not None:
                values = np.clip(values, *clamps[index])
            self.observers[self.names[index]].update_reduced(
                float(lows[index]), float(highs[index]), int(counts[index]), values
            )
        self.runs = []
        self.bytes = 0
