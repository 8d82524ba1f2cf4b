"""The default recipe of `quantize --data`: try each technique, keep what helps.

What helps is what held-out samples say; if the fidelity is still too low, the few nodes
that cost the most are raised to float.

The samples are split (`recipe_samples`): a held-out part (a quarter of them, from
`HELD_OUT` to `MAX_HELD_OUT`, spread evenly over the folder, or the `--eval` folder)
scores, the rest
calibrates. Starting from the plan `--recipe fast` writes, the steps are tried
cheap-first (`STEPS`): the other range method (`auto`'s per-tensor clipping against
minmax), bias correction, weight rounding that minimises each layer's output error
(AdaRound), cross-layer equalization where the graph has Conv pairs for it. A step is
kept only when it improves the held-out fidelity (`Fidelity.improves`: SQNR up over all
samples and on most of them one by one, a sign test, so a gain a few samples carry is
dropped as "gain within noise"; top-1 agreement down by at most one sample, and by none
below the top-1 floor; bias correction, weight rounding and the float input step are
judged on balance instead, `ON_BALANCE`); the kept steps compose, each tried on top of
those kept before.

If the fidelity is still below the floor (`RecipeOptions.floor_sqnr_db`; for
classifier outputs `min_top1_agreement` on the rows expected to flip from their margins,
`Fidelity.meets`), nodes are raised: a raised node computes in float from
its int8-stored weights, so it costs float work, not file bytes (`raise_costs`). Each
candidate (the first and last layers, then the cheapest nodes) is scored raised alone on
top of the kept steps, ranked by the dB it gains per share of the model's
multiply-accumulates it moves to float kernels (its own, and those of the nodes the plan
makes float with it), and raised in that order while the budget
(`RecipeOptions.budget`) allows and while each raise still improves the held-out score,
until the floor holds.

Every trial is a re-run of the tail of the stage list on a kept state, so the search
changes nothing it does not keep, and is deterministic: one process scores, in a fixed
order, on fixed samples.

Once decided, the choices are refitted on every --data sample, the held-out ones included
(`_refit`): the single pass on all samples (`--recipe fast`'s model, byte for byte, when
nothing was kept or raised), then the kept steps, the decided per-tensor range methods
and the raises. The held-out samples score the choices; the statistics need them too.
Only the held-out samples run again: what the trials measured on the calibration samples
merges with them into what one pass over all of them gives, bit for bit.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from qconvert.calibration import Calibration, derive_ranges
from qconvert.calibration.file import merge_calibrations
from qconvert.config import Format
from qconvert.input_grid import first_readers, off_grid_inputs
from qconvert.memory import release_dropped
from qconvert.passes import prepare
from qconvert.passes.adaround import adaround_nodes
from qconvert.passes.bias_correct import correctable_nodes
from qconvert.passes.equalize import EqualizePass
from qconvert.passes.equalize_activations import activation_sites
from qconvert.pipelines.candidate_scoring import CandidateScorer
from qconvert.pipelines.raise_costs import RaiseCost, node_work, raise_cost
from qconvert.pipelines.raise_phase import Raise, raise_nodes, with_raised_reasons
from qconvert.pipelines.recipe_ranges import activation_clipping, other_ranges, ranges_refusal
from qconvert.pipelines.stages import prepares_alike
from qconvert.pipelines.state import QuantizeState
from qconvert.pipelines.weight_passes import FloatInputs, rescaled_by_equalization
from qconvert.plan import QuantPlan
from qconvert.recipe_fidelity import Fidelity, balance_detail, verdict_detail
from qconvert.recipe_result import RaisedNode, RaiseSearch, RecipeResult, Trial

StageFn = Callable[[QuantizeState], QuantizeState]


@dataclass(frozen=True, slots=True, kw_only=True)
class RecipeStages:
    """The stages of `quantize` the recipe re-runs; they live with the pipeline."""

    equalize: StageFn
    calibrate: StageFn
    recalibrate: Callable[[QuantizeState, frozenset[str]], QuantizeState]
    """Calibrates these tensors of the state's float model again, keeping the others'
    statistics (`_equalized`'s trial)."""
    prepare: StageFn
    derive_ranges: StageFn
    plan: StageFn
    auto_check: StageFn
    adaround: StageFn
    correct_biases: StageFn
    rewrite: StageFn
    plan_with: Callable[[QuantizeState, Mapping, frozenset[str], frozenset[str]], QuantPlan]
    """Plans the state's prepared model with these ranges, the first nodes raised (float
    compute, int8-stored weights) and the second kept float, weights and all."""


STEPS = ("float input", "range method", "bias correction", "weight rounding", "equalization")
"""The steps, cheapest first: two plan variants; one float pass over the calibration
samples; one float pass and a least-squares sweep per layer; a whole new calibration.
"float input" raises the first layers reading a graph input whose values lie on a
lattice the 8-bit grid misses (`input_grid`)."""


ON_BALANCE = {"float input": 0.0, "bias correction": 0.5, "weight rounding": 0.5}
"""Steps kept when the held-out score is better over all samples by at least this many dB
(beyond `MIN_GAIN_DB`; of disagreeing frames where frames decide, `Fidelity.gain_db`) and
on at least as many samples as it is worse (`Fidelity.better_on_balance`), not by the
sign test.

"float input" only takes a rounding away (a value read in float where it was rounded to
the grid): nothing is fitted that could suit the held-out samples and not unseen data. On
a CTC recognizer whose input is half a step off the grid, reading it in float gained 0.5
points of frames held out (better on 6 samples, worse on 5, of 16: the sign test wants 10
of 11) and 4.1 dB, 3.4 points of frames and 6 of 42 strings on its eval set.

Bias correction and weight rounding fit each layer's mean error and rounding to the
calibration samples' statistics, which is nearly always right on average, so the burden
of proof is on the held-out samples to say they are worse. 16 held-out samples resolve
too little for the sign test to keep them where unseen data favours them: a CTC text
recognizer's bias correction was better on 9 of 16 held-out lines and worse on 4 (the
sign test wants 11; 0.6 dB fewer disagreeing frames), and on the 42 eval lines it took
exact strings from 47.6% to 57.1%. A one-sided paired signed-rank test on the per-sample
gains does not keep it either (p = 0.15). They must gain 0.5 dB over all, what 16
samples tell apart (`recipe_samples.HELD_OUT`): smaller gains did not reach the eval sets
and cost time (every later trial corrects or rounds too): an inverted-residual CNN's bias
correction, +0.44 dB held-out, gave +0.01 dB on eval for 45% more recipe CPU time. A step
that wins on fewer samples than it loses is dropped: a text detector's bias correction
(better on 7, worse on 9, +0.12 dB over all)."""


def run_recipe(state: QuantizeState, stages: RecipeStages) -> QuantizeState:
    """The default recipe (see the module docstring) from the state after planning."""
    options = state.request.recipe
    progress = state.request.progress
    candidates = CandidateScorer(state, stages.rewrite)
    scorer = candidates.held_out
    score, score_each = candidates.score, candidates.score_each

    # The trials' stages time into a scratch dict, and share the float measurements.
    base = state.replace(timings={}, float_inputs=FloatInputs())
    work = node_work(base.prepared, scorer.samples[0] if scorer.samples else None)
    # The first layers reading an input off the 8-bit grid: raised while "float input"
    # is kept, in every trial after it and in the model written.
    off_grid = off_grid_inputs(base.prepared, base.plan, scorer.samples)
    input_raises = frozenset(
        (name, False) for name in first_readers(base.prepared, off_grid) if name
    )

    costs: dict[str, RaiseCost] = {}

    def input_cost() -> RaiseCost:
        """What the float input step moves to float kernels (the report names it)."""
        if "float input" not in costs:
            trial = planned(frozenset({"float input"}), frozenset())
            costs["float input"] = raise_cost(base.plan, trial.plan, work)
        return costs["float input"]

    equalized: dict[str, QuantizeState] = {}
    built: dict[tuple[frozenset[str], frozenset[Raise]], QuantizeState] = {}

    def build(
        kept: frozenset[str],
        raises: frozenset[Raise] = frozenset(),
        plan: QuantizeState | None = None,
    ) -> QuantizeState:
        """The tail of the pipeline re-run with the `kept` steps and these raises.

        `plan`: their `planned` state, when the caller has it already.
        """
        return _once(built, (kept, raises), lambda: rebuild(kept, raises, plan))

    def rebuild(
        kept: frozenset[str], raises: frozenset[Raise], plan: QuantizeState | None = None
    ) -> QuantizeState:
        return weigh(kept, plan if plan is not None else planned(kept, raises))

    # The plan of the other ranges, by whether equalized: the same for every trial (its
    # per-tensor choice costs more than a plan on a 224x224 depthwise-separable CNN).
    ranged: dict[bool, QuantizeState] = {}

    def planned(kept: frozenset[str], raises: frozenset[Raise]) -> QuantizeState:
        """The kept steps' plan with these raises, before the weight passes.

        The weight passes change weights and notes, never which nodes are quantized: a
        raise's cost (`raise_cost`) is known here, before they run.
        """
        current = base
        if "float input" in kept:
            raises = raises | input_raises
        if "equalization" in kept:
            rounding = "weight rounding" in kept
            current = _once(
                equalized,
                "state",
                lambda: _equalized(base, stages, rounding=rounding, reuse=True),
            )
        if "range method" in kept:
            start = current
            current = _once(
                ranged, "equalization" in kept, lambda: other_ranges(start, stages)
            )
        if raises:
            current = _raising(current, stages, raises)
        return current

    def weigh(kept: frozenset[str], current: QuantizeState) -> QuantizeState:
        """The kept weight passes on a planned state."""
        if "weight rounding" in kept:
            current = stages.adaround(current)
        if "bias correction" in kept:
            current = stages.correct_biases(current)
        return current

    checks = {
        "float input": lambda: _float_input_refusal(off_grid, input_cost, options),
        "range method": lambda: ranges_refusal(base, on_eval=state.evaluation is not None),
        "bias correction": lambda: (
            None
            if correctable_nodes(base.prepared, base.plan)
            else "no quantized Conv/Gemm with a constant bias"
        ),
        "weight rounding": lambda: (
            None
            if adaround_nodes(base.prepared, base.plan)
            else "no quantized Conv, ConvTranspose, MatMul or Gemm weight it can round"
        ),
        "equalization": lambda: _equalize_refusal(base),
    }
    kept: frozenset[str] = frozenset()
    start = best = score(base)
    trials = []
    with progress.task("Trying recipe steps", len(STEPS)) as advance:
        for step in STEPS:
            began = time.perf_counter()
            reason = checks[step]()
            after = None
            if reason is None:
                after = score(build(kept | {step}))
            floor = options.min_top1_agreement
            if step in ON_BALANCE:
                needed = ON_BALANCE[step]
                keep = after is not None and after.better_on_balance(
                    best, top1_floor=floor, min_gain_db=needed
                )
                detail = reason or balance_detail(
                    after, best, top1_floor=floor, min_gain_db=needed
                )
                if step == "float input" and reason is None:
                    detail += (
                        f"; read in float by {', '.join(input_cost().made_float)} "
                        f"({input_cost().work_share * 100:.2f}% of the MACs)"
                    )
            else:
                keep = after is not None and after.improves(best, top1_floor=floor)
                detail = reason or verdict_detail(after, best, top1_floor=floor)
            seconds = round(time.perf_counter() - began, 3)
            trials.append(
                Trial(
                    step=step,
                    kept=keep,
                    before=best,
                    after=after,
                    seconds=seconds,
                    detail=detail,
                )
            )
            if keep:
                kept, best = kept | {step}, after
            _forget_passed(built, kept)
            advance()
    if "equalization" not in kept:
        equalized.clear()  # nothing after the steps asks for the equalized state
    raises: frozenset[Raise] = frozenset()
    raised: tuple[RaisedNode, ...] = ()
    skipped = _raise_refusal(best, options, state.config.format)
    search = RaiseSearch(skipped=skipped)
    if not skipped:
        raises, raised, best, search = raise_nodes(
            build, (planned, weigh), kept, (score, score_each), best, options, progress, work
        )
    final = build(kept, raises)
    if "float input" in kept:
        raises = raises | input_raises  # what `planned` added, for the refit
    refit = 0
    if state.all_samples is not None:
        # The trials' states and the float outputs scored against are done with: the
        # refit calibrates again, and its session should come on top of what is alive.
        # Of the decided state it needs the range choices only: the state's own weights
        # (rounded, corrected: 46 MB on a 224x224 residual CNN) go too.
        decided = _Decided.of(final)
        del final
        built.clear()
        equalized.clear()
        ranged.clear()
        scorer.reference.clear()
        release_dropped()
        final = _refit(state, decided, kept, raises, stages, base.float_inputs)
        refit = len(state.all_samples)
    if raised:
        final = final.replace(plan=with_raised_reasons(final.plan, raised))
    result = RecipeResult(
        samples=len(state.held_out),
        scored_on="--eval samples"
        if state.evaluation is not None
        else "held-out calibration samples",
        start=start,
        trials=tuple(trials),
        raised=raised,
        final=best,
        floor_sqnr_db=options.floor_sqnr_db,
        min_top1_agreement=options.min_top1_agreement,
        budget=options.budget,
        kept=tuple(step for step in STEPS if step in kept),
        refit_samples=refit,
        raise_search=search,
    )
    return final.replace(timings=state.timings, recipe=result)


def _float_input_refusal(
    off_grid: Sequence[str], input_cost: Callable[[], RaiseCost], options
) -> str | None:
    """Why the float input step is not tried, or None (`input_grid`)."""
    if not off_grid:
        return "no quantized graph input on a lattice the 8-bit grid misses"
    cost = input_cost()
    if not cost.made_float:
        return f"the layers reading {', '.join(off_grid)} compute in float already"
    if cost.work_share > options.budget:
        return (
            f"the layers reading {', '.join(off_grid)} hold "
            f"{cost.work_share * 100:.1f}% of the multiply-accumulates, over the "
            f"{options.budget * 100:g}% budget"
        )
    return None


def _raise_refusal(best: Fidelity, options, output_format: Format) -> str:
    """Why the raise phase does not run ('' when it does)."""
    if best.meets(options):
        return "the floor already holds"
    if options.budget <= 0:
        return "the budget is 0"
    if output_format is not Format.QDQ:
        return f"--format {output_format.value} has no float compute on int8-stored weights"
    return ""


def _once(cache: dict, key, make: Callable[[], QuantizeState]) -> QuantizeState:
    """`make()` the first time `key` is asked for, the kept result after.

    The recipe's trials share states this way; every stage returns a new state and
    changes none it is given, so a kept state is what `make()` would give again.
    """
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _forget_passed(built: dict, kept: frozenset[str]) -> None:
    """Drops the built states of every kept set but `kept` (and their models).

    `kept` only grows and each step is tried once, so no later trial, raise or the final
    build asks for another: the states of a dropped step, and of the kept set a step
    joined, are done with. Each can hold a prepared model of its own (the weight passes
    write new weights): on a 224x224 residual CNN with 46 MB of weights they held 80 MB
    by the equalization trial, whose calibration session is built on top.
    """
    for key in [key for key in built if key[0] != kept]:
        del built[key]
    release_dropped()


def _compose(
    start: QuantizeState,
    kept: frozenset[str],
    raises: frozenset[Raise],
    stages: RecipeStages,
    equalized: dict[str, QuantizeState],
    other_ranges: StageFn,
) -> QuantizeState:
    """`start` with the `kept` steps and the raises applied, in the order they compose.

    `equalized` caches the one equalized re-calibration of `start`; `other_ranges` is the
    range method step (a new choice while deciding, the decided one when refitting).
    """
    current = start
    if "equalization" in kept:
        if not equalized:
            equalized["state"] = _equalized(start, stages, rounding="weight rounding" in kept)
        current = equalized["state"]
    if "range method" in kept:
        current = other_ranges(current)
    if raises:
        current = _raising(current, stages, raises)
    if "weight rounding" in kept:
        current = stages.adaround(current)
    if "bias correction" in kept:
        current = stages.correct_biases(current)
    return current


@dataclass(frozen=True, slots=True)
class _Decided:
    """What the refit takes from the decided state: its range choices and their notes."""

    range_choices: Mapping[str, str]
    notes: tuple[str, ...]

    @classmethod
    def of(cls, state: QuantizeState) -> _Decided:
        """The range choices of `state` and its plan's notes on the range method."""
        notes = tuple(note for note in state.plan.notes if note.startswith("Range method"))
        return cls(range_choices=state.range_choices, notes=notes)


def _refit(
    state: QuantizeState,
    decided: _Decided,
    kept: frozenset[str],
    raises: frozenset[Raise],
    stages: RecipeStages,
    float_inputs: FloatInputs,
) -> QuantizeState:
    """The decided recipe re-fitted on every --data sample, held-out ones included.

    Holding a quarter of the samples out costs the statistics more than most steps gain
    (a byte classifier's eval SQNR: 23.1 dB calibrated on 48 samples, 26.0 dB on 64), so the
    held-out samples score the choices and then calibrate too. The choices are kept, the
    statistics refitted: the single pass on all samples (what `--recipe fast` writes,
    byte for byte when nothing was kept or raised), then the kept steps, the range
    method with the per-tensor methods decided (not re-chosen on the new statistics),
    and the raises, on all samples.

    What the trials measured on the calibration samples is not measured again: their
    statistics (`_all_calibration`) and the means bias correction shifts by
    (`float_inputs`, the trials' `FloatInputs` on the same prepared model) take in the
    held-out samples only, and come out as one pass over every sample would give them.
    """
    start = state.replace(
        timings={},
        source=state.all_samples,
        held_out_indices=(),
        calibration=_all_calibration(state, stages),
        ranges={},
        range_choices={},
        float_inputs=float_inputs.for_samples(),
    )
    for stage in (stages.derive_ranges, stages.plan):
        start = stage(start)
    if start.range_choices:
        start = stages.auto_check(start)
    if not kept and not raises:
        return start
    choices = decided.range_choices

    def decided_ranges(current: QuantizeState) -> QuantizeState:
        ranges = dict(current.ranges)
        for name in sorted(set(choices.values())):
            method = dataclasses.replace(current.range_method, name=name)
            chosen = {tensor for tensor, value in choices.items() if value == name}
            observers = {
                tensor: observer
                for tensor, observer in current.calibration.observers.items()
                if tensor in chosen
            }
            ranges.update(derive_ranges(observers, method))
        plan = stages.plan_with(current, ranges, frozenset(), frozenset())
        plan = dataclasses.replace(plan, notes=(*plan.notes, *decided.notes))
        return current.replace(
            plan=plan, ranges=ranges, range_choices={**current.range_choices, **choices}
        )

    return _compose(start, kept, raises, stages, {}, decided_ranges)


def _all_calibration(state: QuantizeState, stages: RecipeStages) -> Calibration:
    """The statistics of every --data sample: the held-out ones' merged into the split's.

    Observers merge exactly (`calibration.observers`), and with one sample a run (the
    calibrate stage's batch size) each sample's values are those of one pass over the
    whole folder, so the merge equals that pass bit for bit, for a quarter of its runs.
    The held-out samples run in this process (`--workers` would re-open the folder's
    calibration part): the statistics are the same however they are split.
    """
    # Where the scheme's preparation is calibration's, the prepared model is the model
    # calibration runs (`prepares_alike`), and is not prepared again from the float one.
    alike = prepares_alike(state.float_model, state.config)
    held_out = stages.calibrate(
        state.replace(
            request=dataclasses.replace(state.request, workers=None),
            source=state.held_out,
            held_out_indices=(),
            calibration=None,
            calibrated=state.prepared if alike else None,
        )
    )
    return merge_calibrations(
        [("calibration samples", state.calibration), ("held-out", held_out.calibration)]
    )


def _raising(
    state: QuantizeState, stages: RecipeStages, raises: frozenset[Raise]
) -> QuantizeState:
    compute = frozenset(name for name, float_weights in raises if not float_weights)
    floated = frozenset(name for name, float_weights in raises if float_weights)
    plan = stages.plan_with(state, state.ranges, compute, floated)
    extra = tuple(note for note in state.plan.notes if note not in plan.notes)
    return state.replace(plan=dataclasses.replace(plan, notes=(*plan.notes, *extra)))


def _equalize_refusal(state: QuantizeState) -> str | None:
    prepared = prepare(state.float_model.clone(), min_opset=1)
    equalize = EqualizePass()
    equalize(prepared)
    if equalize.pairs:
        return None
    if state.config.per_channel and activation_sites(prepared):
        return None
    return "no Conv -> [Relu] -> Conv pair or activation it can rescale"


def _equalized(
    base: QuantizeState, stages: RecipeStages, *, rounding: bool, reuse: bool = False
) -> QuantizeState:
    """The stages from equalization to the plan, re-run on the float model.

    The ranges follow the base plan's choice (minmax everywhere, or auto's clipping): the
    range method has had its own trial. `rounding`: whether weight rounding is kept, and
    will run on the equalized model; where it is not, bias correction's float pass on it
    measures no H for rounding (`FloatInputs.grams`), which no step would use.

    `reuse` (the trials, on `base`'s samples): equalization rescales only the tensors
    between its pairs and sites, so only those are calibrated again, and what the weight
    passes measured on every other tensor (input means, the roundings of layers whose
    weights and input are as they were) is taken from `base` (`FloatInputs.unchanged_on`).
    On a 224 depthwise-separable CNN that keeps weight rounding, the trial calibrated,
    measured H and swept every layer again for 2 equalized pairs. The other tensors are
    the same function of the input, so the trial scores the same candidate up to float
    rounding; the refit, which writes the model, calibrates and measures afresh.
    """
    state = base.replace(
        float_model=base.float_model.clone(),
        calibration=None,
        ranges={},
        range_choices={},
        float_inputs=FloatInputs(rounding_follows=rounding),
    )
    state = stages.equalize(state)
    if reuse:
        rescaled = rescaled_by_equalization(
            state.float_model, per_channel=state.config.per_channel
        )
        state = stages.recalibrate(state.replace(calibration=base.calibration), rescaled)
        state = state.replace(
            float_inputs=base.float_inputs.unchanged_on(
                state.float_model, rescaled, rounding_follows=rounding
            )
        )
    else:
        # No auto check follows: the float outputs calibration kept for one can go.
        state = stages.calibrate(state).replace(float_outputs=None)
    for stage in (stages.prepare, stages.derive_ranges):
        state = stage(state)
    if state.range_choices and not activation_clipping(base):
        method = dataclasses.replace(state.range_method, name="minmax")
        ranges = dict(derive_ranges(state.calibration.observers, method))
        state = state.replace(ranges=ranges, range_choices=dict.fromkeys(ranges, "minmax"))
    return stages.plan(state)
