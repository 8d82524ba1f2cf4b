"""Choosing each int4 weight's rounding: to nearest, activation-aware clipping, or GPTQ.

Without samples every weight is rounded to nearest (with `search`, each block's range
shrunk to its least squared error first); on the int8 kernel's grid the range is always
searched first (`grid_rounding`). With samples, the float model runs once over
them and each MatMul/Gemm input's Gram matrix X^T X is summed (one K x K matrix per input,
whatever the number of samples). One sample in four is held out. From the Gram matrix of
the others each weight is rounded three ways: to nearest; with AWQ-class clipping (each
block's range shrunk to the least squared error weighted by its inputs' mean square, the
diagonal of X^T X); and by GPTQ. The one whose output error on the held-out samples,
tr(E^T H_held E), is least is kept, per layer, and the report counts the choices.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx_ir as ir

from qconvert import model as model_io
from qconvert.awq import ScaleChoice
from qconvert.blockwise import (
    BlockQuantized,
    column_units,
    quantize_columns_int8,
    quantize_rtn,
)
from qconvert.gptq import gram, layer_error, quantize_gptq
from qconvert.grid_rounding import quantize_grid_searched
from qconvert.plan.int4 import BlockedWeight

HOLD_OUT_EVERY = 4
"""Every fourth sample is held out to judge GPTQ against round-to-nearest."""

MIN_SAMPLES_TO_HOLD_OUT = 4


@dataclass(slots=True)
class Grams:
    """Summed X^T X of each layer input: on the fitting samples, and on the held-out ones."""

    fit: dict[str, np.ndarray] = field(default_factory=dict)
    held: dict[str, np.ndarray] = field(default_factory=dict)
    fit_samples: int = 0
    held_samples: int = 0


class GramSource(Protocol):
    """What the rounding reads of the Gram matrices: `Grams`, or `int4_grams.GroupedGrams`."""

    fit: Mapping[str, np.ndarray]
    held: Mapping[str, np.ndarray]
    fit_samples: int
    held_samples: int


def split_counts(samples: int) -> tuple[int, int]:
    """(fitting, held-out) sample counts, as `accumulate_grams` splits `samples` runs."""
    if samples < MIN_SAMPLES_TO_HOLD_OUT:
        return samples, 0
    held = samples // HOLD_OUT_EVERY
    return samples - held, held


def accumulate_grams(
    runs: Iterable[Mapping[str, np.ndarray]], widths: Mapping[str, int]
) -> Grams:
    """Sums X^T X of each named input over the runs, holding out one run in four.

    `runs` yields, per sample, the arrays of the tensors in `widths` (name -> K).
    """
    grams = Grams()
    for index, values in enumerate(runs):
        held = index % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
        target = grams.held if held else grams.fit
        for name, k in widths.items():
            array = values[name]
            if array.shape[-1] != k:  # a layout this rule does not read: no statistics
                continue
            update = gram(array, k)
            target[name] = target[name] + update if name in target else update
        if held:
            grams.held_samples += 1
        else:
            grams.fit_samples += 1
    if grams.fit_samples + grams.held_samples < MIN_SAMPLES_TO_HOLD_OUT:
        # too few to spare any: fit on them all, and keep GPTQ unjudged
        for name, h in grams.held.items():
            grams.fit[name] = grams.fit[name] + h if name in grams.fit else h
        grams.fit_samples += grams.held_samples
        grams.held, grams.held_samples = {}, 0
    return grams


@dataclass(slots=True)
class RoundingRecord:
    """What was chosen for one weight, and the held-out errors behind the choice."""

    weight: str
    method: str
    rtn_error: float | None = None
    chosen_error: float | None = None
    errors: dict[str, float] | None = None
    scaled: bool = False


class Rounder:
    """Quantizes one planned weight on demand (the rewrite pass calls it while saving).

    Args:
        tensors: the float weights by initializer name (read, then released).
        block_size, symmetric: the scheme's blocks.
        search: shrink each block's range to its least squared error.
        grams: the layer inputs' Gram matrices (`Grams`, or measured a group at a time:
            `int4_grams`), or None without data.
        inputs: per planned node, the name of its input tensor (the key into `grams`).
        int8_grid: MatMul/Gemm weights of 4 bits get scales on the int8 grid
            (`blockwise`), for the int8 kernel; every candidate rounding keeps to it.
        input_scales: per node, the AWQ-class input scale kept for it (`awq`): its weight
            is rounded as diag(s) W, with the Gram matrices of x / s.
    """

    def __init__(
        self,
        tensors: Mapping[str, ir.TensorProtocol],
        *,
        block_size: int,
        symmetric: bool,
        search: bool,
        grams: GramSource | None = None,
        inputs: Mapping[str, str] | None = None,
        int8_grid: bool = False,
        input_scales: Mapping[str, ScaleChoice] | None = None,
    ) -> None:
        self.tensors = tensors
        self.block_size = block_size
        self.symmetric = symmetric
        self.search = search
        self.grams = grams
        self.inputs = inputs or {}
        self.int8_grid = int8_grid
        self.input_scales = dict(input_scales or {})
        self.records: dict[tuple[str, int], RoundingRecord] = {}
        self._settled: dict[tuple[str, int], BlockQuantized] = {}

    def __call__(self, entry: BlockedWeight) -> BlockQuantized:
        """The weight of `entry` quantized, (N, K); records the rounding chosen."""
        settled = self._settled.pop((entry.weight, entry.bits), None)
        if settled is not None:
            return settled
        return self._read_and_quantize(entry, self.input_scales.get(entry.node))

    def settle_scale(self, entry: BlockedWeight, choice: ScaleChoice) -> bool:
        """Rounds `entry` now, with and without the input scale of `choice`.

        The one whose chosen rounding has the lower held-out error is held until the save
        asks for it. Returns whether the scale was kept (the rewrite then divides the
        input by it).
        """
        key = (entry.weight, entry.bits)
        plain = self._read_and_quantize(entry, None)
        plain_record = self.records[key]
        scaled = self._read_and_quantize(entry, choice)
        scaled_record = self.records[key]
        keep = (scaled_record.chosen_error or 0.0) < (plain_record.chosen_error or 0.0)
        if keep:
            self.input_scales[entry.node] = choice
            self._settled[key] = scaled
        else:
            self.input_scales.pop(entry.node, None)
            self.records[key] = plain_record
            self._settled[key] = plain
        return keep

    def hold(self, entry: BlockedWeight) -> BlockQuantized:
        """`entry` quantized now (its chosen rounding), held until the save asks for it."""
        key = (entry.weight, entry.bits)
        if key not in self._settled:
            choice = self.input_scales.get(entry.node)
            self._settled[key] = self._read_and_quantize(entry, choice)
        return self._settled[key]

    def forget(self, entry: BlockedWeight) -> None:
        """Drops what was held or recorded for `entry`, and its input scale.

        A layer `int4_mix` raises to 8 bits is rounded again as its new entry says.
        """
        key = (entry.weight, entry.bits)
        self._settled.pop(key, None)
        self.records.pop(key, None)
        self.input_scales.pop(entry.node, None)

    def _read_and_quantize(
        self, entry: BlockedWeight, choice: ScaleChoice | None
    ) -> BlockQuantized:
        tensor = self.tensors[entry.weight]
        model_io.prefetch(self._this_and_next(entry.weight))
        quantized = self._quantize(tensor.numpy(), entry, choice)
        # a weight in external data is memory-mapped: unmap it before the next one
        release = getattr(tensor, "release", None)
        if release is not None:
            release()
        return quantized

    def _this_and_next(self, weight: str) -> list[ir.TensorProtocol]:
        """The weight's tensor and the one after it (the pass writes them in this order)."""
        names = list(self.tensors)
        position = names.index(weight)
        return [self.tensors[name] for name in names[position : position + 2]]

    def _quantize(
        self, array: np.ndarray, entry: BlockedWeight, choice: ScaleChoice | None
    ) -> BlockQuantized:
        wt = array if entry.transposed else array.T  # (N, K), a view
        scales = choice.scales if choice is not None else None
        if scales is not None:
            wt = wt * scales[None, :]  # diag(s) W, read by an input divided by s
        options = {
            "block_size": self.block_size,
            "bits": entry.bits,
            "symmetric": self.symmetric,
        }
        # a tied output projection shares the table's codes, so keeps its plain scales
        own = entry.op_type != "Gather" and entry.tied_to is None
        key = (entry.weight, entry.bits)
        if self.int8_grid and own and entry.bits == 8:
            # kept at 8 bits on the int8 kernel: per-column int8, nothing left to round
            self.records[key] = RoundingRecord(entry.weight, "rtn")
            return quantize_columns_int8(wt)
        name = self.inputs.get(entry.node)
        fit = self.grams.fit.get(name) if self.grams is not None and name else None
        if self.int8_grid and own:
            options["units"] = column_units(wt)
        if self.int8_grid and own and (self.search or fit is None):
            # without data (or with --scale-search): the searched range, then the grid
            rtn = quantize_grid_searched(wt, block_size=self.block_size)
        else:
            rtn = quantize_rtn(wt, search=self.search, **options)
        if fit is None or entry.op_type == "Gather":
            self.records[key] = RoundingRecord(entry.weight, "rtn")
            return rtn
        held = self.grams.held.get(name)
        if scales is not None:  # the Gram matrices of x / s
            inverse = 1.0 / scales.astype(np.float64)
            fit = fit * np.outer(inverse, inverse)
            held = held * np.outer(inverse, inverse) if held is not None else None
        w = np.ascontiguousarray(wt.T, dtype=np.float32)
        gptq = quantize_gptq(w, fit, search=self.search, **options)
        if held is None:
            self.records[key] = RoundingRecord(entry.weight, "gptq")
            return gptq
        # AWQ-class clipping: each block's range shrunk to the least error weighted by
        # its inputs' mean square on the fitting samples
        clipped = quantize_rtn(wt, importance=np.diag(fit).astype(np.float32), **options)
        candidates = {"rtn": rtn, "awq-clip": clipped, "gptq": gptq}
        errors = {
            method: layer_error(w, result.dequantize().T, held)
            for method, result in candidates.items()
        }
        method = min(errors, key=lambda m: (errors[m], m != "rtn"))
        # against round-to-nearest of the weight as it was, unscaled
        rtn_error = choice.base_error if choice is not None and scales is not None else None
        self.records[key] = RoundingRecord(
            entry.weight,
            method,
            errors["rtn"] if rtn_error is None else rtn_error,
            errors[method],
            errors,
            scales is not None,
        )
        return candidates[method]

    def note(self) -> str | None:
        """The report's line on the roundings chosen, or None without data."""
        if self.grams is None:
            return None
        judged = [r for r in self.records.values() if r.errors is not None]
        unjudged = [r for r in self.records.values() if r.method == "gptq" and not r.errors]
        if not self.grams.held_samples:
            return (
                f"GPTQ rounding on {len(unjudged)} weight(s) from {self.grams.fit_samples} "
                "sample(s); too few samples to hold any out, so it was not judged against "
                "round-to-nearest."
            )
        counts = {
            method: sum(r.method == method for r in judged)
            for method in ("gptq", "awq-clip", "rtn")
        }
        gains = [
            10 * math.log10(r.rtn_error / r.chosen_error)
            for r in judged
            if r.rtn_error and r.chosen_error
        ]
        median = float(np.median(gains)) if gains else 0.0
        scaled = sum(r.scaled for r in judged)
        scaling = (
            f"; AWQ-class input scaling (a Mul by 1/s before the layer) kept on {scaled} of "
            "them"
            if self.int8_grid
            else ""
        )
        return (
            f"Rounding chosen per weight by its layer's output error on "
            f"{self.grams.held_samples} held-out sample(s) (fitted on "
            f"{self.grams.fit_samples}): GPTQ on {counts['gptq']}, AWQ-class activation-"
            f"aware clipping on {counts['awq-clip']}, round-to-nearest on {counts['rtn']} "
            f"of {len(judged)} (median {median:+.2f} dB against round-to-nearest){scaling}."
        )
