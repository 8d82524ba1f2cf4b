"""The stages of `quantize`, in the order `STAGES` runs them.

Each stage takes the `QuantizeState` (`pipelines.state`) and returns the next; `STAGES` is
the literal list `pipelines.quantize.quantize` runs, and the default recipe
(`pipelines.recipe`) re-runs its tail.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import onnx

from qconvert import model as model_io
from qconvert.calibration import (
    RangeMethod,
    read_calibration,
)
from qconvert.compare import (
    Comparison,
    Side,
    compare_on_folder,
)
from qconvert.cpu import lacks_vnni
from qconvert.dataset import (
    DirectorySource,
    input_specs,
)
from qconvert.errors import (
    ConfigError,
)
from qconvert.file_weights import read_from_file
from qconvert.fusion_audit import kernel_gates
from qconvert.passes import (
    DropIntermediateShapesPass,
)
from qconvert.pipelines.auto_check import AUTO_CHECK_SAMPLES, check_against_minmax
from qconvert.pipelines.calibration_stages import calibrate, recalibrate
from qconvert.pipelines.mixed_precision import (
    check_mixed_precision,
    evaluator_on,
    plan_mixed_precision,
)
from qconvert.pipelines.planning import (
    apply_plan,
    plan_of,
    plan_raising,
    used_range_choices,
    with_report_notes,
)
from qconvert.pipelines.recipe import RecipeStages, run_recipe
from qconvert.pipelines.recipe_samples import recipe_applies, split_samples
from qconvert.pipelines.stages import (
    PathLike,
    prepare_for_scheme,
    ranges_of,
    upgrade_old_opset,
)
from qconvert.pipelines.state import (
    QuantizeState,
    Stage,
    releasing,
)
from qconvert.pipelines.verify_save import verify_and_save_model
from qconvert.pipelines.weight_passes import (
    adaround_weights,
    check_weight_passes,
    correct_biases_of,
    equalize_model,
    smooth_model,
)
from qconvert.recipe_result import notes as recipe_notes
from qconvert.report import Conversion, Report, check_report_path
from qconvert.schemes import DynamicScheme, Float16Scheme, StaticScheme
from qconvert.selection import NodeSelection
from qconvert.sensitivity import (
    Target,
    quantizable_nodes,
)

logger = logging.getLogger("qconvert")


def check_options(state: QuantizeState) -> QuantizeState:
    """Refuses option combinations that cannot work, before anything is read."""
    request, config = state.request, state.config
    if request.workers is not None and request.workers < 1:
        raise ConfigError(f"--workers {request.workers} must be at least 1.")
    scheme = config.resolve_scheme()
    if scheme.needs_calibration and request.data is None and request.calib is None:
        raise ConfigError(
            f"--scheme {config.scheme} needs calibration data: pass --data DIR or "
            "--calib FILE.",
            hint=_no_data_hint(request.model),
        )
    if request.data is not None and request.calib is not None:
        raise ConfigError(
            "Pass --data or --calib, not both.",
            hint="--data calibrates now; --calib reads a file from `qconvert calibrate`.",
        )
    range_method = None
    if isinstance(scheme, StaticScheme):
        range_method = RangeMethod(
            name=request.method,
            percentile=request.percentile,
            bits=scheme.activation_dtype.itemsize * 8,
        )
    if request.eval_data is not None and not config.keep_io_types:
        raise ConfigError(
            "--eval does not go with --no-keep-io-types: the float and converted models "
            "would need different input types.",
            hint="evaluate with --keep-io-types (the default).",
        )
    target = Target(sqnr_db=request.target_sqnr, max_top1_drop=request.max_top1_drop)
    state = state.replace(scheme=scheme, range_method=range_method, target=target)
    if state.mixed:
        check_mixed_precision(config, target, request.data, request.eval_data)
    check_weight_passes(config, request.data, request.calib)
    output = model_io.check_output_path(
        request.output, force=request.force, source=request.model
    )
    if request.report is not None:
        check_report_path(request.report)
    return state.replace(output=output)


def load(state: QuantizeState) -> QuantizeState:
    """Reads the model, and opens the data folders and the calibration file."""
    request, config, scheme = state.request, state.config, state.scheme
    model, data, limits, images = request.model, request.data, request.limits, request.images
    calibrating = scheme.needs_calibration and data is not None
    # fp16 measures the magnitudes tensors reach when data is given, to keep float32
    # the nodes whose values would overflow float16.
    measuring = (
        isinstance(scheme, Float16Scheme) and not scheme.storage_only and data is not None
    )
    # past the limit, weights stay on disk for sessions to map (`runtime.external_weights`)
    inline = model_io.INLINE_WEIGHTS_LIMIT if calibrating or measuring else None
    float_model = model_io.load_model(model, limits, keep_external_past=inline)
    model_io.check_convertible(float_model, model)
    model_io.fix_input_shapes(float_model, config.input_shapes)
    opset_before = float_model.opset_imports.get("", 1)
    float_model, reference = upgrade_old_opset(float_model, model)
    if config.opset is not None and config.opset < opset_before:
        raise ConfigError(
            f"--opset {config.opset} is below the model's opset {opset_before}; "
            "qconvert only upgrades.",
            hint=f"pass --opset {opset_before} or later, or leave it out.",
        )
    external = model_io.uses_external_data(model)
    specs = input_specs(float_model)
    source = (
        DirectorySource(data, specs, images=images, limits=limits)
        if calibrating or measuring
        else None
    )
    calibration = None
    if scheme.needs_calibration and request.calib is not None:
        calibration = read_calibration(request.calib)
        calibration.check_model(model_io.fingerprint(model), request.calib, str(model))
    evaluation = (
        DirectorySource(request.eval_data, specs, images=images, limits=limits)
        if request.eval_data is not None
        else None
    )
    return state.replace(
        float_model=float_model,
        reference=reference,
        opset_before=opset_before,
        external=external,
        specs=specs,
        measuring=measuring,
        source=source,
        calibration=calibration,
        evaluation=evaluation,
    )


def equalize(state: QuantizeState) -> QuantizeState:
    """Cross-layer equalization of the float model (`--equalize`)."""
    float_model, notes = equalize_model(
        state.float_model, state.source, per_channel=state.config.per_channel
    )
    return state.replace(float_model=float_model, notes=(*state.notes, *notes))


def warn_without_vnni(state: QuantizeState) -> QuantizeState:
    """Warns on CPUs where onnxruntime's u8 x s8 kernels can saturate (no VNNI)."""
    scheme = state.scheme
    if isinstance(scheme, StaticScheme | DynamicScheme) and not scheme.reduce_range:
        if lacks_vnni():
            logger.warning(
                "This CPU lacks VNNI: onnxruntime's u8 x s8 kernels can saturate here. "
                "Pass --reduce-range (7-bit weights) for models that will run on it."
            )
    return state


def smooth(state: QuantizeState) -> QuantizeState:
    """SmoothQuant on the float model (`--smooth-quant`)."""
    float_model, notes = smooth_model(
        state.float_model, state.source, state.config.smooth_quant
    )
    return state.replace(float_model=float_model, notes=(*state.notes, *notes))


def prepare(state: QuantizeState) -> QuantizeState:
    """Prepares a copy of the float model for the scheme (`passes.prepare`).

    A copy: preparing changes the model in place, and a recipe re-runs stages on the
    float model. Where calibration's preparation is the scheme's (`prepares_alike`), the
    copy calibration kept of its prepared model is taken instead of preparing again.
    """
    config = state.config
    selection = NodeSelection(exclude=config.exclude, include_only=config.include_only)
    if state.calibrated is not None:  # calibration prepared it alike (`prepares_alike`)
        prepared, qdq_domain = state.calibrated, ""
    else:
        prepared, qdq_domain = prepare_for_scheme(state.float_model.clone(), config)
    selection.warn_unmatched(prepared.graph)
    # What preparation replaced is read from the file again if a stage asks for it.
    read_from_file(state.float_model, state.request.model, prepared)
    return state.replace(
        selection=selection, prepared=prepared, qdq_domain=qdq_domain, calibrated=None
    )


def derive_ranges(state: QuantizeState) -> QuantizeState:
    """Each calibrated tensor's range, by the range method."""
    ranges, range_choices = ranges_of(state.calibration, state.range_method)
    return state.replace(ranges=ranges, range_choices=range_choices)


def plan(state: QuantizeState) -> QuantizeState:
    """Decides, per tensor, what is quantized and how (`qconvert.plan`)."""
    return state.replace(plan=plan_of(state, state.ranges))


def auto_check(state: QuantizeState) -> QuantizeState:
    """Keeps `auto`'s per-tensor range choices only where the model gains from them."""
    checks = state.source or state.evaluation
    checked = check_against_minmax(
        state.plan,
        ranges=state.ranges,
        choices=state.range_choices,
        calibration=state.calibration,
        method=state.range_method,
        plan_with=lambda other: plan_of(state, other),
        evaluator=(
            lambda: evaluator_on(
                state.prepared, checks, AUTO_CHECK_SAMPLES, reference=state.float_outputs
            )
        )
        if checks is not None
        else None,
        samples_from="calibration" if checks is state.source else "evaluation",
    )
    return state.replace(
        plan=checked.plan,
        ranges=checked.ranges,
        range_choices=checked.choices,
        float_outputs=None,  # taken or not, not needed again
    )


def search_recipe(state: QuantizeState) -> QuantizeState:
    """The default recipe: tries each technique on held-out samples (`pipelines.recipe`)."""
    # Its trials re-run these stages: each is a stage boundary, where what a stage
    # dropped is freed (`state.releasing`), as between the pipeline's own stages.
    stages = RecipeStages(
        equalize=releasing(equalize),
        calibrate=releasing(calibrate),
        recalibrate=recalibrate,
        prepare=releasing(prepare),
        derive_ranges=derive_ranges,
        plan=plan,
        auto_check=releasing(auto_check),
        adaround=releasing(adaround),
        correct_biases=releasing(correct_biases),
        rewrite=rewrite,
        plan_with=plan_raising,
    )
    return run_recipe(state, stages)


def mixed_precision(state: QuantizeState) -> QuantizeState:
    """Keeps float the fewest, most sensitive nodes until the target holds."""
    nodes = len(quantizable_nodes(state.plan))
    with state.request.progress.task("Ranking nodes", nodes) as advance:
        mixed = plan_mixed_precision(
            state.prepared,
            state.scheme,
            state.config,
            state.selection,
            state.ranges,
            state.evaluation or state.source,
            state.target,
            advance,
        )
    return state.replace(plan=mixed)


def adaround(state: QuantizeState) -> QuantizeState:
    """Rounds the planned weights to minimise each layer's output error (`--adaround`).

    On a copy of the prepared model (its weights are replaced, not written into), so the
    state before this stage still holds the float weights.
    """
    prepared, originals = state.prepared.clone(), dict(state.originals)
    plan = adaround_weights(
        prepared, state.plan, state.source, originals, inputs=state.float_inputs
    )
    return state.replace(prepared=prepared, plan=plan, originals=originals)


def correct_biases(state: QuantizeState) -> QuantizeState:
    """Shifts biases by the mean error their quantized weights make (`--bias-correction`).

    On a copy of the prepared model, as `adaround`.
    """
    prepared = state.prepared.clone()
    plan = correct_biases_of(
        prepared, state.plan, state.source, state.originals, inputs=state.float_inputs
    )
    return state.replace(prepared=prepared, plan=plan)


def add_notes(state: QuantizeState) -> QuantizeState:
    """Adds what the report must say about opsets, domains, speed and the float passes."""
    noted = with_report_notes(
        state.plan, state.config, state.opset_before, state.prepared, state.qdq_domain
    )
    story = recipe_notes(state.recipe) if state.recipe is not None else ()
    notes = (*state.notes, *noted.notes, *story)
    return state.replace(plan=dataclasses.replace(noted, notes=notes))


def rewrite(state: QuantizeState) -> QuantizeState:
    """Applies the plan to a copy of the prepared model (`passes`).

    The passes rewrite in place; the copy keeps the state's prepared model as it was, so
    the stages from `plan` on can run again on the same state.
    """
    converted = apply_plan(state.prepared.clone(), state.plan, state.config, state.qdq_domain)
    DropIntermediateShapesPass()(converted)
    converted.producer_name = "qconvert"
    return state.replace(converted=converted)


def verify_and_save(state: QuantizeState) -> QuantizeState:
    """Verifies the converted model on one sample, then writes it (times its own parts)."""
    request, source = state.request, state.source
    if source is None and request.data is not None:  # data a scheme does not calibrate on
        source = DirectorySource(
            request.data, state.specs, images=request.images, limits=request.limits
        )
    saved, notes, audit = verify_and_save_model(
        state.converted,
        state.output,
        model=state.reference,
        specs=state.specs,
        source=source,
        external=state.external,
        timings=state.timings,
        plan=state.plan,
    )
    plan = dataclasses.replace(state.plan, notes=(*state.plan.notes, *notes))
    return state.replace(saved=saved, plan=plan, fusion_audit=audit)


def evaluate(state: QuantizeState) -> QuantizeState:
    """Compares the float model with the one written, on `--eval`."""
    request, evaluation = state.request, state.evaluation
    with request.progress.task("Evaluating", len(evaluation)) as advance:
        comparison = _evaluate(
            request.model,
            state.output,
            state.saved,
            evaluation,
            advance,
            reference=state.reference,
            per_layer=request.per_layer,
            sizes=_sizes(state),
        )
    return state.replace(comparison=comparison)


def write_report(state: QuantizeState) -> QuantizeState:
    """Builds the report, and writes it where `--report` says."""
    request, calibration = state.request, state.calibration
    result = Report(
        command="quantize",
        model=str(request.model),
        output=str(state.output),
        conversion=Conversion.from_plan(
            state.plan,
            opsets=(state.opset_before, state.converted.opset_imports.get("", 1)),
            sizes=_sizes(state),
            samples=calibration.samples if calibration is not None else 0,
            range_methods=used_range_choices(state.range_choices, state.plan),
            fusion_audit=state.fusion_audit,
            observers=calibration.observers if calibration is not None else None,
            node_schemes=state.config.overrides.nodes,
        ),
        comparison=state.comparison,
        seconds=state.timings,
        gates=kernel_gates(state.fusion_audit) if request.strict_kernels else (),
    )
    if state.recipe is not None:
        result = dataclasses.replace(
            result, conversion=dataclasses.replace(result.conversion, recipe=state.recipe)
        )
    if request.report is not None:
        result.write(request.report)
    return state.replace(report=result)


STAGES: tuple[Stage, ...] = (
    Stage(check_options),
    Stage(load, "load"),
    Stage(split_samples, when=recipe_applies),
    Stage(equalize, "equalize", when=lambda s: s.config.equalize),
    Stage(warn_without_vnni),
    Stage(
        smooth,
        "smooth",
        when=lambda s: s.config.smooth_quant is not None and s.source is not None,
    ),
    Stage(calibrate, "calibrate", when=lambda s: s.source is not None),
    Stage(prepare, "prepare"),
    Stage(
        derive_ranges,
        "ranges",
        when=lambda s: s.calibration is not None and s.range_method is not None,
    ),
    Stage(plan, "plan"),
    Stage(auto_check, "auto check", when=lambda s: bool(s.range_choices)),
    Stage(search_recipe, "recipe", when=lambda s: s.held_out is not None),
    Stage(mixed_precision, "mixed precision", when=lambda s: s.mixed),
    Stage(adaround, "adaround", when=lambda s: s.config.adaround and s.source is not None),
    Stage(
        correct_biases,
        "bias correction",
        when=lambda s: s.config.bias_correction and s.source is not None,
    ),
    Stage(add_notes, "plan"),
    Stage(rewrite, "rewrite"),
    Stage(verify_and_save),
    Stage(evaluate, "evaluate", when=lambda s: s.evaluation is not None),
    Stage(write_report),
)
"""The quantize pipeline: load -> prepare -> calibrate -> plan -> rewrite -> verify ->
save -> evaluate -> report, with the optional passes between."""


def _sizes(state: QuantizeState) -> tuple[int, int]:
    """The float and the written model's bytes on disk, from what the run knows already.

    A model without external data is its file alone, and the model written whole is the
    bytes saved: `model.file_size` would read each file through for external-data
    references (18 MB for a 224x224 inverted-residual CNN and its int8 output, 17 ms of
    CPU after calibration). Models with external data still add up their data files.
    """
    model = state.request.model
    float_bytes = model_io.file_size(model) if state.external else Path(model).stat().st_size
    if isinstance(state.saved, bytes):
        return float_bytes, len(state.saved)
    return float_bytes, model_io.file_size(state.output)


TRANSFORMER_OPS = frozenset(
    {"LayerNormalization", "Attention", "MultiHeadAttention", "Softmax"}
)
"""Ops whose presence beside MatMul marks a model as transformer-like."""


def _no_data_hint(model: PathLike) -> str:
    """The hint for a static scheme without data: int8-dynamic first for transformers."""
    try:  # a glance only: a model that does not load fails properly later
        graph = onnx.load(str(model), load_external_data=False).graph
        ops = {node.op_type for node in graph.node}
    except Exception:  # noqa: BLE001
        ops = set()
    if "MatMul" in ops and ops & TRANSFORMER_OPS:
        return (
            "this looks like a transformer (MatMul with "
            f"{', '.join(sorted(ops & TRANSFORMER_OPS))}): --scheme int8-dynamic needs no "
            "data and quantizes its MatMul weights; fp16 and fp16-weights need none either."
        )
    return "int8-dynamic, fp16 and fp16-weights need none."


def _evaluate(
    model: PathLike,
    output: Path,
    converted: bytes | str,
    evaluation: DirectorySource,
    advance: Callable[[], None],
    *,
    reference: bytes | str,
    per_layer: bool = False,
    sizes: tuple[int, int],
) -> Comparison:
    """Compares the float model with the converted one just written.

    `converted` is the serialized model, or its path when it was saved with external data;
    `reference` is the float model onnxruntime runs (its bytes when its opset was raised);
    `sizes` are the two models' bytes on disk (`_sizes`).
    """
    return compare_on_folder(
        Side(model=reference, path=str(model), bytes=sizes[0]),
        Side(model=converted, path=str(output), bytes=sizes[1]),
        evaluation,
        per_layer=per_layer,
        on_sample=advance,
    )
