"""What the default recipe did, as data: the report's `recipe` section and its rows.

The recipe (`pipelines.recipe`) fills a `RecipeResult`; the report renderers read it
through `notes` and `recipe_rows`. It lives apart from the pipeline so the report layer
imports no pipeline. How each step was decided is `recipe_fidelity`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from qconvert.errors import ConfigError
from qconvert.recipe_fidelity import MIN_RAISE_GAIN_DB, Fidelity

RECIPES = ("default", "fast")
"""`default` measures and decides; `fast` is the single pass of plan and rewrite."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RecipeOptions:
    """How `quantize` searches (the command line's --recipe, --floor-sqnr, --raise-budget).

    Attributes:
        name: `default` or `fast` (`RECIPES`).
        floor_sqnr_db: raise nodes to float while the held-out output SQNR is below it.
            25 dB: the fidelity a model needs when nothing better than SQNR says what
            matters (issue 16's target for "anything else"); detectors of the bench
            hold their agreement from about 20-25 dB. Classifier outputs are not held
            to it: their floor is `min_top1_agreement`, on the flips their margins
            predict (`Fidelity.meets`).
        min_top1_agreement: for classifier-like outputs, raise nodes while the held-out
            top-1 agreement with the float model is below it: expected from the rows'
            margins where they are known (`class_flips`), else counted.
        budget: the share of the model's multiply-accumulates that raised nodes (and the
            nodes the plan makes float with them) may move to float kernels, and the
            share of its weight bytes they may store float (each). A raise keeps its
            weights int8 in the file unless their own rounding is the error, so the
            budget is mostly one of work. 5%: 5% of the work on float kernels, about
            2-3x slower than int8 ones, costs about 10% of int8 latency (0.5x float ->
            0.55x <= the 0.6x target); 5% of the weights float adds 3.75 points to an
            int8 file of 25% (28.75% <= the 30% target).
    """

    name: str = "default"
    floor_sqnr_db: float = 25.0
    min_top1_agreement: float = 0.97
    budget: float = 0.05

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise ConfigError(
                f"Unknown recipe '{self.name}'.", hint=f"choose from {', '.join(RECIPES)}."
            )
        if not 0.0 <= self.budget <= 1.0:
            raise ConfigError(
                f"--raise-budget {self.budget * 100:g} is out of range.",
                hint="give a percentage from 0 to 100 (5 is the default).",
            )


FAST = RecipeOptions(name="fast")


@dataclass(frozen=True, slots=True, kw_only=True)
class Trial:
    """One step the recipe tried."""

    step: str
    kept: bool
    before: Fidelity
    after: Fidelity | None
    """None when the step did not apply (`detail` says why)."""
    seconds: float
    detail: str = ""
    """Why it was not tried, or on how many samples it won (`verdict_detail`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RaisedNode:
    """A node the recipe kept float, and what it bought and cost."""

    name: str
    op_type: str
    gain_db: float
    """Held-out SQNR gained by raising this node alone."""
    work_share: float
    """The share of the model's multiply-accumulates raising it alone moves to float
    kernels: its own, and those of `made_float`."""
    weight_share: float = 0.0
    """Its weights' share of the model's weight bytes when they are stored float too (where
    their own rounding is the error); 0 when they stay int8 in the file."""
    made_float: tuple[str, ...] = ()
    """Nodes the plan makes float with it: the layer writing its input, which would
    otherwise run as a float kernel between Q/DQ pairs."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RaiseSearch:
    """How the raise phase went, so the report can say why it raised what it did.

    The counts narrow down in order: the nodes on integer kernels, those whose own work
    fits the budget, those scored raised alone (`MAX_RANKED` at most), those that improved
    on the kept steps alone (`Fidelity.improves`) by `MIN_RAISE_GAIN_DB`. `skipped` is
    why it did not run at all ('' when it ran).
    """

    skipped: str = ""
    quantized: int = 0
    affordable: int = 0
    scored: int = 0
    gaining: int = 0
    best_alone: tuple[str, float] | None = None
    """The node whose raise alone scored best, and its gain in dB (may be negative)."""
    rejected: tuple[str, ...] = ()
    """Each gaining candidate tried and not raised: `name (+g dB alone): why`."""
    floor_met: bool = False
    """Whether the floor held once the raises were made."""

    def describe(self, budget: float) -> str:
        """Why the phase raised what it did, in one sentence."""
        if self.skipped:
            return f"not run: {self.skipped}"
        share = f"{budget * 100:g}%"
        text = (
            f"{self.quantized} quantized nodes, {self.affordable} of them within the "
            f"{share} budget alone, {self.scored} scored raised alone"
        )
        if self.best_alone is not None:
            name, gain = self.best_alone
            text += f" (best: {name}, {gain:+.1f} dB)"
        if self.floor_met:
            return text + "; the floor holds with the raises made"
        if not self.affordable:
            return text + f"; no node's own work fits the {share} budget"
        if not self.gaining:
            return (
                text + f"; none improved by {MIN_RAISE_GAIN_DB:g} dB alone, so none was raised"
            )
        text += f"; {self.gaining} improved by {MIN_RAISE_GAIN_DB:g} dB alone"
        if self.rejected:
            text += "; not raised: " + "; ".join(self.rejected)
        return text


@dataclass(frozen=True, slots=True, kw_only=True)
class RecipeResult:
    """What the default recipe did: the report's `recipe` section."""

    samples: int
    """Samples scored on."""
    scored_on: str
    """"held-out calibration samples" or "--eval samples"."""
    start: Fidelity
    trials: tuple[Trial, ...]
    raised: tuple[RaisedNode, ...]
    final: Fidelity
    floor_sqnr_db: float
    min_top1_agreement: float
    budget: float
    kept: tuple[str, ...]
    refit_samples: int = 0
    """The samples the decided recipe was refitted on (held-out ones included); 0 when
    it was not (the held-out samples were --eval's)."""
    raise_search: RaiseSearch | None = None
    """How the raise phase went (`RaiseSearch.describe`: why it raised what it did)."""


def notes(result: RecipeResult) -> tuple[str, ...]:
    """The recipe's story, one note per line of it, for every report format."""
    lines = [
        f"Recipe default: scored on {result.samples} {result.scored_on}; the single-pass "
        f"plan gives {result.start.describe()}."
    ]
    for trial in result.trials:
        if trial.after is None:
            lines.append(f"Recipe step {trial.step}: not tried: {trial.detail}.")
            continue
        verdict = "kept" if trial.kept else "dropped"
        if trial.detail:
            verdict += f", {trial.detail}"
        lines.append(
            f"Recipe step {trial.step}: {trial.before.describe()} -> "
            f"{trial.after.describe()}: {verdict} ({trial.seconds:.1f} s)."
        )
    for node in result.raised:
        lines.append(
            f"Recipe raised {node.name} ({node.op_type}): {raise_kind(node)}: "
            f"+{node.gain_db:.1f} dB alone, for {_cost(node)}."
        )
    if result.raise_search is not None:
        lines.append(f"Recipe raise phase: {result.raise_search.describe(result.budget)}.")
    floor = _floor(result)
    verdict = "met" if result.final.meets(_options_of(result)) else "NOT met"
    lines.append(
        f"Recipe result: {result.final.describe()} on the {result.scored_on} ({floor}: "
        f"{verdict}; kept: {', '.join(result.kept) or 'nothing'}; raised "
        f"{len(result.raised)} node(s) within a budget of {result.budget * 100:g}%)."
    )
    if result.refit_samples:
        lines.append(
            f"Recipe refit: the choices above, calibrated on all {result.refit_samples} "
            "--data samples (the held-out ones included) for the model written."
        )
    return tuple(lines)


RECIPE_HEADER = ["step", "held-out before", "held-out after", "verdict", "seconds"]


def recipe_rows(result: RecipeResult) -> list[list[str]]:
    """The recipe as table rows (Markdown and HTML reports): steps, raised nodes, result."""
    rows = [["single pass", "", result.start.describe(), "start", ""]]
    for trial in result.trials:
        if trial.after is None:
            rows.append([trial.step, "", "", f"not tried: {trial.detail}", ""])
            continue
        verdict = "kept" if trial.kept else "dropped"
        if trial.detail:
            verdict += f": {trial.detail}"
        rows.append(
            [
                trial.step,
                trial.before.describe(),
                trial.after.describe(),
                verdict,
                f"{trial.seconds:.1f}",
            ]
        )
    for node in result.raised:
        rows.append(
            [
                f"raise {node.name} ({node.op_type})",
                "",
                f"+{node.gain_db:.1f} dB alone",
                f"{raise_kind(node)}: {_cost(node)}",
                "",
            ]
        )
    if result.raise_search is not None:
        rows.append(["raise phase", "", "", result.raise_search.describe(result.budget), ""])
    met = "met" if result.final.meets(_options_of(result)) else "NOT met"
    rows.append(["result", "", result.final.describe(), f"{_floor(result)} {met}", ""])
    return rows


def _floor(result: RecipeResult) -> str:
    """The floor, as the notes and the result row say it.

    `floor 25 dB`, `floor 25 dB and top-1 97%`, for sequences of class distributions
    `floor top-1 97% of sequences`, and for classifiers whose flips are expected from
    their margins `floor top-1 97%, expected from the margins` (and `, 25 dB on the other
    outputs` beside them) (`Fidelity.meets`).
    """
    top1 = f"top-1 {result.min_top1_agreement * 100:g}%"
    if result.final.frame_agreement is not None:
        floor = f"floor top-1 {result.min_top1_agreement * 100:g}% of sequences"
    elif result.final.flip_rate is not None:
        floor = f"floor {top1}, expected from the margins"
        if result.final.rest_sqnr_db is not None:
            floor += f", {result.floor_sqnr_db:g} dB on the other outputs"
        return floor
    else:
        floor = f"floor {result.floor_sqnr_db:g} dB"
    if result.final.top1_agreement is not None:
        floor += f" and {top1}"
    return floor


def raise_kind(node: RaisedNode) -> str:
    """What a raise keeps float: the compute, or the compute and the weights."""
    if node.weight_share > 0.0:
        return "float compute, float weights"
    return "float compute, int8-stored weights"


def _cost(node: RaisedNode) -> str:
    """`1.20% of the MACs on float kernels, no file bytes`, and what it made float."""
    text = f"{node.work_share * 100:.2f}% of the MACs on float kernels, "
    if node.weight_share > 0.0:
        text += f"{node.weight_share * 100:.2f}% of the weight bytes float"
    else:
        text += "no file bytes"
    if node.made_float:
        text += f" (made float with it: {', '.join(node.made_float)})"
    return text


def _options_of(result: RecipeResult) -> RecipeOptions:
    return RecipeOptions(
        floor_sqnr_db=result.floor_sqnr_db,
        min_top1_agreement=result.min_top1_agreement,
        budget=result.budget,
    )
