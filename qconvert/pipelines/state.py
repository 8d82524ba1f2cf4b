"""The quantize pipeline's state, and the runner of a list of stages over it.

As onnx_ir's `PassManager` runs a literal list of passes over a model, `run_stages` runs a
literal list of `Stage`s over one `QuantizeState`: each stage takes the state and returns
the next one, `dataclasses.replace`d where it computed something. A stage reads only what
earlier stages left in the state, never reaches back, and skips itself (`when`) when the
options say it has nothing to do. A recipe is such a list; trying a step re-runs the tail
of it from a state kept before the step.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qconvert.config import QuantizeConfig
from qconvert.limits import DEFAULT_LIMITS, LoadLimits
from qconvert.memory import release_dropped
from qconvert.pipelines.stages import PathLike, timed
from qconvert.progress import SILENT, Progress

if TYPE_CHECKING:
    import onnx_ir as ir

    from qconvert.calibration import Calibration, RangeMethod
    from qconvert.compare import Comparison
    from qconvert.dataset import DirectorySource, ImagePreprocessing, InputSpec
    from qconvert.fusion_audit import FusionAudit
    from qconvert.pipelines.weight_passes import FloatInputs
    from qconvert.plan import QuantPlan
    from qconvert.recipe_result import RecipeOptions, RecipeResult
    from qconvert.report import Report
    from qconvert.schemes import DynamicScheme, Float16Scheme, StaticScheme
    from qconvert.selection import NodeSelection
    from qconvert.sensitivity import FloatOutputs, Target

logger = logging.getLogger("qconvert")


@dataclass(frozen=True, slots=True, kw_only=True)
class QuantizeRequest:
    """What `quantize` was asked to do: its arguments, as given (see `quantize`)."""

    model: PathLike
    output: PathLike
    data: PathLike | None = None
    calib: PathLike | None = None
    method: str = "auto"
    percentile: float = 99.99
    images: ImagePreprocessing | None = None
    config: QuantizeConfig = field(default_factory=QuantizeConfig)
    eval_data: PathLike | None = None
    per_layer: bool = False
    target_sqnr: float | None = None
    max_top1_drop: float | None = None
    report: PathLike | None = None
    force: bool = False
    workers: int | None = 1
    progress: Progress = SILENT
    limits: LoadLimits = DEFAULT_LIMITS
    strict_kernels: bool = False
    recipe: RecipeOptions | None = None
    """The recipe and its floor and budget; None: `fast`, the single pass."""


@dataclass(frozen=True, slots=True, kw_only=True)
class QuantizeState:
    """Everything the stages of `quantize` hand each other, in the order they fill it.

    `timings` is the one shared accumulator: the runner records each timed stage in it,
    and it becomes the report's `seconds`.
    """

    request: QuantizeRequest
    timings: dict[str, float] = field(default_factory=dict)
    defer: bool = True
    """Whether calibration may leave out the tensors only a clamp reads
    (`calibration.deferral`); False on the run that starts over when a plan read one."""
    # check
    scheme: StaticScheme | DynamicScheme | Float16Scheme | None = None
    range_method: RangeMethod | None = None
    target: Target | None = None
    output: Path | None = None
    # load
    float_model: ir.Model | None = None
    reference: bytes | str | None = None  # what onnxruntime runs as the float model
    opset_before: int = 1
    external: bool = False
    specs: tuple[InputSpec, ...] = ()
    measuring: bool = False
    source: DirectorySource | None = None
    calibration: Calibration | None = None
    evaluation: DirectorySource | None = None
    # split samples: what the default recipe scores on, and the indices it took from data
    held_out: DirectorySource | None = None
    held_out_indices: tuple[int, ...] = ()
    # the whole --data folder before the split: the recipe refits its choices on it
    all_samples: DirectorySource | None = None
    # equalize, smooth: notes that go ahead of the plan's own
    notes: tuple[str, ...] = ()
    # calibrate
    peaks: dict[str, float] = field(default_factory=dict)
    calibrated: ir.Model | None = None
    deferred: frozenset[str] = frozenset()
    """The tensors calibration left out: a plan that reads one stops the run."""
    float_outputs: FloatOutputs | None = None
    """The float model's outputs on the first calibration samples, for `auto`'s check."""
    """The model calibration prepared, untouched, when the prepare stage can take it as
    its own (`stages.prepares_alike`); that stage empties it."""
    # prepare
    selection: NodeSelection | None = None
    prepared: ir.Model | None = None
    qdq_domain: str = ""
    # ranges, auto check
    ranges: dict[str, Any] = field(default_factory=dict)
    range_choices: dict[str, str] = field(default_factory=dict)
    # plan, mixed precision, weight passes
    plan: QuantPlan | None = None
    originals: dict[str, Any] = field(default_factory=dict)
    float_inputs: FloatInputs | None = None
    """What the weight passes measured on this prepared model, for the recipe's re-runs."""
    # recipe
    recipe: RecipeResult | None = None
    # rewrite, verify and save, evaluate, report
    converted: ir.Model | None = None
    saved: bytes | str | None = None
    fusion_audit: FusionAudit | None = None
    comparison: Comparison | None = None
    report: Report | None = None

    @property
    def config(self) -> QuantizeConfig:
        """The configuration asked for."""
        return self.request.config

    @property
    def mixed(self) -> bool:
        """Whether a mixed-precision target was asked for."""
        return self.target is not None and (
            self.target.sqnr_db is not None or self.target.max_top1_drop is not None
        )

    def replace(self, **changes: Any) -> QuantizeState:
        """A copy with `changes`: what a stage returns."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, slots=True)
class Stage:
    """One stage of a pipeline.

    Attributes:
        run: takes the state, returns the next one.
        timing: the key its seconds go under in the report; None for a stage that takes
            no measurable time or times its own parts.
        when: runs the stage only when this says so; None runs it always.
    """

    run: Callable[[QuantizeState], QuantizeState]
    timing: str | None = None
    when: Callable[[QuantizeState], bool] | None = None

    @property
    def name(self) -> str:
        """The stage's name: its function's."""
        return self.run.__name__


def releasing(
    run: Callable[[QuantizeState], QuantizeState],
) -> Callable[[QuantizeState], QuantizeState]:
    """`run`, then the models it dropped freed: for stages run outside `run_stages`."""

    @functools.wraps(run)
    def released(state: QuantizeState) -> QuantizeState:
        state = run(state)
        release_dropped()
        return state

    return released


def run_stages(stages: Iterable[Stage], state: QuantizeState) -> QuantizeState:
    """Runs each stage that applies, in order, timing the timed ones into `state.timings`.

    After each, the models it dropped are freed (`memory.release_dropped`), so the next
    stage's sessions are built on what is alive, not on every clone dropped before.
    """
    for stage in stages:
        if stage.when is not None and not stage.when(state):
            continue
        logger.debug("quantize: %s", stage.name)
        if stage.timing is None:
            state = stage.run(state)
        else:
            with timed(state.timings, stage.timing):
                state = stage.run(state)
        release_dropped()
    return state
