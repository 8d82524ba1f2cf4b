"""`analyze` and `inspect`: what quantizing each node costs, and what a model holds."""

from __future__ import annotations

from qconvert import model as model_io
from qconvert.calibration import (
    CollectSettings,
    RangeMethod,
)
from qconvert.config import QuantizeConfig
from qconvert.dataset import (
    DirectorySource,
    ImagePreprocessing,
    input_specs,
)
from qconvert.errors import (
    ConfigError,
)
from qconvert.inspection import ModelSummary, summarize
from qconvert.limits import DEFAULT_LIMITS, LoadLimits
from qconvert.pipelines.auto_check import check_against_minmax
from qconvert.pipelines.calibrate import collect_calibration
from qconvert.pipelines.mixed_precision import evaluator_on, planner
from qconvert.pipelines.stages import PathLike, prepare_for_scheme, ranges_of
from qconvert.progress import SILENT, Progress
from qconvert.schemes import StaticScheme
from qconvert.selection import NodeSelection
from qconvert.sensitivity import (
    Analysis,
    quantizable_nodes,
)
from qconvert.sensitivity import analyze as _analyze


def analyze(
    model: PathLike,
    *,
    data: PathLike,
    samples: int = 16,
    method: str = "auto",
    images: ImagePreprocessing | None = None,
    config: QuantizeConfig | None = None,
    progress: Progress = SILENT,
    limits: LoadLimits = DEFAULT_LIMITS,
) -> Analysis:
    """Ranks the quantizable nodes of `model` by what quantizing each one alone costs.

    One calibration on every sample of `data`; each node's variant is then scored on
    `samples` of them (`qconvert.sensitivity`).
    """
    config = config if config is not None else QuantizeConfig()
    scheme = config.resolve_scheme()
    if not isinstance(scheme, StaticScheme):
        raise ConfigError(
            f"analyze does not go with --scheme {config.scheme}.",
            hint="it ranks nodes of a static scheme: int8 or 16x8.",
        )
    if samples < 1:
        raise ConfigError(f"--samples {samples} must be at least 1.")
    float_model = model_io.load_model(model, limits)
    model_io.check_convertible(float_model, model)
    source = DirectorySource(data, input_specs(float_model), images=images, limits=limits)
    calibration = collect_calibration(
        model, float_model.clone(), source, CollectSettings(), progress
    )
    prepared, _ = prepare_for_scheme(float_model, config)
    range_method = RangeMethod(name=method, bits=scheme.activation_dtype.itemsize * 8)
    ranges, choices = ranges_of(calibration, range_method)
    selection = NodeSelection(exclude=config.exclude, include_only=config.include_only)
    evaluator = evaluator_on(prepared, source, samples)
    if choices:  # rank the nodes of the model quantize would write
        ranges = check_against_minmax(
            planner(prepared, scheme, config, selection, ranges)(frozenset()),
            ranges=ranges,
            choices=choices,
            calibration=calibration,
            method=range_method,
            plan_with=lambda other: planner(prepared, scheme, config, selection, other)(
                frozenset()
            ),
            evaluator=lambda: evaluator,
            samples_from="calibration",
        ).ranges
    plan_for = planner(prepared, scheme, config, selection, ranges)
    count = len(quantizable_nodes(plan_for(frozenset())))
    with progress.task("Ranking nodes", count) as advance:
        return _analyze(str(model), plan_for, evaluator, advance)


def inspect(model: PathLike, *, limits: LoadLimits = DEFAULT_LIMITS) -> ModelSummary:
    """Summarizes `model`: interface, opsets, ops, parameters and quantizable nodes."""
    return summarize(model_io.load_model(model, limits))
