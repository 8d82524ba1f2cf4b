"""The `auto` range method's check: its per-tensor choices against minmax, on the model.

`calibration.auto` picks, per tensor, the range of least expected quantization error. That
estimate counts each tensor alone, and the two kinds of error do not travel alike: rounding
noise is zero-mean and averages out over the many inputs of the next layer, while clipping
always pulls the largest values inwards, so its errors add up coherently layer after layer.
Per-tensor choices can therefore lose at the output what they win per tensor (an 18-layer
residual CNN in `make bench`, 2026-11-23: 27.7 dB output SQNR against minmax's 34.4 dB), and
win big where outliers stretch the grid (a 6-layer sentence encoder: 4.6 dB against 3.0 dB).

So the plan of per-tensor choices is scored against the plan of minmax ranges on a few samples
(the worst output's SQNR against the float model). As per tensor (`MIN_GAIN`), clipping must
halve minmax's error to be kept: here its output noise energy, 3 dB of SQNR. The margin covers
what the score cannot see: both plans are scored on calibration samples, the very ones the
clipping thresholds were fitted to, and clipped ranges fare worse on data unlike them (a small
text-orientation classifier, calibrated on rendered lines and run on a scanned page: clipping 6
activations scored +1.5 dB on the calibration samples and lost 4.7 points of top-1 agreement on
the page).
Without samples to score on (`--calib` without `--eval`) nothing can be checked, and
minmax, the choice that never clips, is kept.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from qconvert.calibration import Calibration, RangeMethod, derive_ranges
from qconvert.calibration.auto import MIN_GAIN
from qconvert.calibration.observers import TensorRange
from qconvert.plan import QuantPlan, Role
from qconvert.sensitivity import Evaluator

MIN_OUTPUT_GAIN_DB = 10 * math.log10(1 / (1 - MIN_GAIN))
"""The output SQNR gain over minmax the clipping plan needs: its noise energy halved."""

AUTO_CHECK_SAMPLES = 16
"""Samples each of the two plans is scored on: enough to tell plans several dB apart, few
enough to cost about two float passes over them."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckedRanges:
    """The plan `auto` keeps, its ranges, and the method behind each tensor's range."""

    plan: QuantPlan
    ranges: Mapping[str, TensorRange]
    choices: Mapping[str, str]


def check_against_minmax(
    plan: QuantPlan,
    *,
    ranges: Mapping[str, TensorRange],
    choices: Mapping[str, str],
    calibration: Calibration,
    method: RangeMethod,
    plan_with: Callable[[Mapping[str, TensorRange]], QuantPlan],
    evaluator: Callable[[], Evaluator] | None,
    samples_from: str,
) -> CheckedRanges:
    """Keeps `plan` (built from `auto`'s per-tensor choices) or the minmax plan, the better.

    Args:
        plan: the plan built from `ranges`.
        ranges: the ranges `auto` chose per tensor.
        choices: the method behind each of those ranges.
        calibration: the statistics the ranges come from.
        method: the `auto` range method asked for (its bits and percentile).
        plan_with: plans the model with other ranges, as `plan` was planned.
        evaluator: makes the scorer of plans on samples; None when there are none. It is
            called only when some activation clips: its float session and runs are then
            needed, and on a model where `auto` chose minmax everywhere they are not.
        samples_from: where the evaluator's samples come from, for the note.
    """
    clipping = [
        name
        for name, decision in plan.tensors.items()
        if decision.role is Role.ACTIVATION and choices.get(name, "minmax") != "minmax"
    ]
    if not clipping:
        return CheckedRanges(plan=plan, ranges=ranges, choices=choices)
    minmax_method = dataclasses.replace(method, name="minmax")
    minmax = dict(derive_ranges(calibration.observers, minmax_method))
    all_minmax = dict.fromkeys(choices, "minmax")
    minmax_plan = plan_with(minmax)
    if evaluator is None:
        note = (
            f"Range method auto: {len(clipping)} activation(s) would clip, but there were no "
            "samples to check that on the model, so every range is minmax (pass --data or "
            "--eval to let auto check its choices)."
        )
        return _kept(minmax_plan, minmax, all_minmax, note)
    evaluator = evaluator()
    samples = len(evaluator.samples)
    if evaluator.scores_side_by_side():
        chosen, minmax_score = evaluator.score_each((plan, minmax_plan))
        chosen_db, minmax_db = chosen.sqnr_db, minmax_score.sqnr_db
        gave = f"{chosen_db:.1f} dB"
    else:
        # One after the other: minmax's score sets the bar, and the clipping plan's
        # samples stop once its SQNR can no longer clear it (`score_unless_below`).
        minmax_db = evaluator.score(minmax_plan).sqnr_db
        bounded = evaluator.score_unless_below(plan, minmax_db + MIN_OUTPUT_GAIN_DB)
        chosen_db = bounded.sqnr_db
        gave = (
            f"{chosen_db:.1f} dB"
            if bounded.exact
            else f"at most {chosen_db:.1f} dB (bound after {bounded.samples} of {samples})"
        )
    scores = (
        f"{gave} output SQNR against minmax's {minmax_db:.1f} dB on {samples} "
        f"{samples_from} samples"
    )
    if chosen_db >= minmax_db + MIN_OUTPUT_GAIN_DB:
        note = f"Range method auto: {len(clipping)} activation(s) clipped: {scores}."
        return _kept(plan, ranges, choices, note)
    note = (
        f"Range method auto: clipping {len(clipping)} activation(s) gave {scores}, short "
        f"of the {MIN_OUTPUT_GAIN_DB:.1f} dB gain that halves the error, so every range "
        "is minmax."
    )
    return _kept(minmax_plan, minmax, all_minmax, note)


def _kept(
    plan: QuantPlan, ranges: Mapping[str, TensorRange], choices: Mapping[str, str], note: str
) -> CheckedRanges:
    noted = dataclasses.replace(plan, notes=(*plan.notes, note))
    return CheckedRanges(plan=noted, ranges=ranges, choices=choices)
