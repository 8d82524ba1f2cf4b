"""The Python API: one function per verb, each returning a `Report`.

The command line is a thin layer over these functions. Each runs its pipeline as a visible
list of stages: load -> prepare -> calibrate -> plan -> rewrite -> verify -> save -> evaluate.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from qconvert import model as model_io
from qconvert.calibration import (
    Calibration,
    CollectSettings,
    RangeMethod,
    collect_statistics,
    derive_ranges,
    merge_calibrations,
    read_calibration,
    tensors_to_calibrate,
    write_trt_cache,
)
from qconvert.calibration.auto import choose_ranges
from qconvert.calibration.collect import pass_count
from qconvert.calibration.parallel import DataSpec, collect_split
from qconvert.calibration.ray_backend import RayCluster
from qconvert.compare import (
    CompareOptions,
    Comparison,
    Side,
    check_interfaces,
    compare_models,
    folder_labels,
    load_labels,
)
from qconvert.config import Format, QuantizeConfig
from qconvert.cpu import lacks_vnni
from qconvert.dataset import (
    DirectorySource,
    Feeds,
    ImagePreprocessing,
    InputSpec,
    Sample,
    input_specs,
    synthetic_sample,
)
from qconvert.errors import (
    CalibrationDataError,
    ConfigError,
    OutputError,
    UnsupportedModelError,
)
from qconvert.gates import NO_GATES, Gates, check_gates
from qconvert.inspection import ModelSummary, summarize
from qconvert.latency import LatencyConfig
from qconvert.layers import expose
from qconvert.limits import DEFAULT_LIMITS, LoadLimits
from qconvert.passes import (
    CastToFloat16Pass,
    DropIntermediateShapesPass,
    DynamicQuantizePass,
    FloatInputsPass,
    InsertQDQPass,
    QDQToQOperatorPass,
    StoreWeightsAsFloat16Pass,
    prepare,
)
from qconvert.passes.adaround import adaround, adaround_nodes, gram_matrices
from qconvert.passes.bias_correct import (
    channel_means,
    correct_biases,
    correctable_nodes,
    input_axis,
)
from qconvert.passes.equalize import EqualizePass
from qconvert.passes.smooth import channel_absmax, smooth, smooth_sites
from qconvert.plan import QuantPlan, make_dynamic_plan, make_float16_plan, make_plan
from qconvert.progress import SILENT, Progress
from qconvert.report import Conversion, Report, check_report_path
from qconvert.runtime import describe_error, make_session, resolve_provider
from qconvert.saved_outputs import SavedOutputs
from qconvert.schemes import INT16_MIN_OPSET, DynamicScheme, Float16Scheme, StaticScheme
from qconvert.selection import NodeSelection
from qconvert.sensitivity import (
    Analysis,
    Evaluator,
    MixedPrecision,
    Score,
    Target,
    choose_float_nodes,
    quantizable_nodes,
)
from qconvert.sensitivity import analyze as _analyze
from qconvert.verify import verify_model

PathLike = str | os.PathLike[str]

logger = logging.getLogger("qconvert")

_MICROSOFT = "com.microsoft"

_TRT_METHOD = RangeMethod(name="entropy")  # TensorRT's own default calibrator

CALIBRATION_LIMIT = model_io.PROTOBUF_LIMIT
"""The most bytes of weights a model may hold to be calibrated: the calibration stage hands
onnxruntime the model as one protobuf."""


def quantize(
    model: PathLike,
    output: PathLike,
    *,
    data: PathLike | None = None,
    calib: PathLike | None = None,
    method: str = "minmax",
    percentile: float = 99.99,
    images: ImagePreprocessing | None = None,
    config: QuantizeConfig | None = None,
    eval_data: PathLike | None = None,
    target_sqnr: float | None = None,
    max_top1_drop: float | None = None,
    report: PathLike | None = None,
    force: bool = False,
    progress: Progress = SILENT,
    limits: LoadLimits = DEFAULT_LIMITS,
) -> Report:
    """Quantizes `model` as `config` says and writes `output`.

    Args:
        model: the float ONNX model; it is only read.
        output: where the quantized model goes (refused if it exists, unless `force`).
            A model whose weights live in external data is written with its tensors in
            `<output name>.data` beside it.
        data: a folder of calibration samples, calibrated on the fly (static schemes need
            it or `calib`; int8-dynamic, fp16 and fp16-weights need neither).
        calib: a calibration file from `calibrate` (instead of `data`).
        method: how ranges are derived from the statistics: auto (per tensor, the method
            of least expected error; the report lists the choices), minmax, percentile,
            entropy or mse (see `qconvert.calibration.ranges`).
        percentile: the share of values kept by the percentile method, in percent.
        images: the preprocessing of image folders (`data` and `eval_data`).
        config: scheme, format and controls; `QuantizeConfig()` is int8 QDQ.
        eval_data: a folder of evaluation samples (with `labels.npy` for accuracy): the
            float and quantized models are compared on it and the result goes in the report.
        target_sqnr: mixed precision: keep the fewest, most sensitive nodes float until
            the output SQNR (dB) on the evaluation samples (`eval_data`, else the first
            calibration samples) is at least this (`qconvert.sensitivity`).
        max_top1_drop: mixed precision: likewise until the top-1 accuracy drop on
            `eval_data` (with labels) is at most this many points.
        report: a file to write the report to (`.json`, `.md` or `.html`).
        force: overwrite an existing output.
        progress: receives progress of the long steps.
        limits: bounds the model must respect before its weights are read.

    Returns:
        The report: sizes, what was quantized and what was not, and the comparison.

    Example::

        config = QuantizeConfig(scheme="16x8", exclude=("head.*",))
        report = qconvert.quantize("model.onnx", "model.16x8.onnx", data="calib/",
                                   config=config)
    """
    config = config if config is not None else QuantizeConfig()
    scheme = config.resolve_scheme()
    if scheme.needs_calibration and data is None and calib is None:
        raise ConfigError(
            f"--scheme {config.scheme} needs calibration data: pass --data DIR or "
            "--calib FILE.",
            hint=_no_data_hint(model),
        )
    if data is not None and calib is not None:
        raise ConfigError(
            "Pass --data or --calib, not both.",
            hint="--data calibrates now; --calib reads a file from `qconvert calibrate`.",
        )
    range_method = None
    if isinstance(scheme, StaticScheme):
        range_method = RangeMethod(
            name=method, percentile=percentile, bits=scheme.activation_dtype.itemsize * 8
        )
    if eval_data is not None and not config.keep_io_types:
        raise ConfigError(
            "--eval does not go with --no-keep-io-types: the float and converted models "
            "would need different input types.",
            hint="evaluate with --keep-io-types (the default).",
        )
    target = Target(sqnr_db=target_sqnr, max_top1_drop=max_top1_drop)
    mixed = target.sqnr_db is not None or target.max_top1_drop is not None
    if mixed:
        _check_mixed_precision(config, target, data, eval_data)
    _check_weight_passes(config, data, calib)
    output = model_io.check_output_path(output, force=force)
    if report is not None:
        check_report_path(report)
    timings: dict[str, float] = {}

    with _timed(timings, "load"):
        float_model = model_io.load_model(model, limits)
        model_io.check_convertible(float_model, model)
        model_io.fix_input_shapes(float_model, config.input_shapes)
        opset_before = float_model.opset_imports.get("", 1)
        if config.opset is not None and config.opset < opset_before:
            raise ConfigError(
                f"--opset {config.opset} is below the model's opset {opset_before}; "
                "qconvert only upgrades.",
                hint=f"pass --opset {opset_before} or later, or leave it out.",
            )
        external = model_io.uses_external_data(model)
        calibrating = scheme.needs_calibration and data is not None
        if calibrating and _tensor_bytes(float_model) > CALIBRATION_LIMIT:
            raise UnsupportedModelError(
                f"Model '{model}' holds over 2 GB of weights: calibration hands the model "
                f"to onnxruntime as one protobuf, which cannot exceed 2 GB, so --scheme "
                f"{config.scheme} cannot calibrate it yet.",
                hint="use --scheme int8-dynamic or fp16-weights, which need no calibration.",
            )
        specs = input_specs(float_model)
        # fp16 measures the magnitudes tensors reach when data is given, to keep float32
        # the nodes whose values would overflow float16.
        measuring = (
            isinstance(scheme, Float16Scheme) and not scheme.storage_only and data is not None
        )
        source = (
            DirectorySource(data, specs, images=images, limits=limits) if calibrating or measuring else None
        )
        calibration = None
        if scheme.needs_calibration and calib is not None:
            calibration = read_calibration(calib)
            calibration.check_model(model_io.fingerprint(model), calib, str(model))
        evaluation = (
            DirectorySource(eval_data, specs, images=images, limits=limits)
            if eval_data is not None
            else None
        )
    equalize_notes: tuple[str, ...] = ()
    if config.equalize:
        with _timed(timings, "equalize"):
            float_model, equalize_notes = _equalize(float_model)
    if isinstance(scheme, StaticScheme | DynamicScheme) and not scheme.reduce_range:
        if lacks_vnni():
            logger.warning(
                "This CPU lacks VNNI: onnxruntime's u8 x s8 kernels can saturate here. "
                "Pass --reduce-range (7-bit weights) for models that will run on it."
            )
    if config.smooth_quant is not None and source is not None:
        with _timed(timings, "smooth"):
            float_model, smooth_notes = _smooth(float_model, source, config.smooth_quant)
        equalize_notes = (*equalize_notes, *smooth_notes)
    peaks: dict[str, float] = {}
    if measuring:
        with (
            _timed(timings, "calibrate"),
            progress.task("Measuring ranges", len(source)) as advance,
        ):
            peaks = _float16_peaks(float_model, source, advance)
    elif source is not None:
        # minmax needs no histogram; skipping it makes on-the-fly calibration cheaper. The
        # other methods histogram exactly as `calibrate` does, so --data equals --calib.
        settings = CollectSettings()
        if method == "minmax":
            settings = CollectSettings(histogram_values=0)
        with (
            _timed(timings, "calibrate"),
            progress.task("Calibrating", len(source)) as advance,
        ):
            calibration = _calibrate(model, float_model, source, settings, advance)
    selection = NodeSelection(exclude=config.exclude, include_only=config.include_only)
    with _timed(timings, "prepare"):
        prepared, qdq_domain = _prepare(float_model, config)
        selection.warn_unmatched(prepared.graph)
    ranges = {}
    range_choices: dict[str, str] = {}
    if calibration is not None and range_method is not None:
        with _timed(timings, "ranges"):
            ranges, range_choices = _derive_ranges(calibration, range_method)
    with _timed(timings, "plan"):
        plan = _plan(prepared, scheme, config, selection, ranges, peaks)
    if mixed:
        with (
            _timed(timings, "mixed precision"),
            progress.task("Ranking nodes", len(quantizable_nodes(plan))) as advance,
        ):
            plan = _mixed_precision(
                model, prepared, scheme, config, selection, ranges, evaluation or source,
                target, advance,
            )
    originals: dict = {}
    if config.adaround and source is not None:
        with _timed(timings, "adaround"):
            plan = _adaround(prepared, plan, source, originals)
    if config.bias_correction and source is not None:
        with _timed(timings, "bias correction"):
            plan = _correct_biases(prepared, plan, source, originals)
    with _timed(timings, "plan"):
        plan = _with_notes(plan, config, opset_before, prepared, qdq_domain)
        plan = dataclasses.replace(plan, notes=(*equalize_notes, *plan.notes))
    with _timed(timings, "rewrite"):
        converted = _rewrite(prepared, plan, config, qdq_domain)
        DropIntermediateShapesPass()(converted)
        converted.producer_name = "qconvert"
    if source is None and data is not None:  # data a scheme does not calibrate on
        source = DirectorySource(data, specs, images=images, limits=limits)
    nonfinite: frozenset[str] = frozenset()
    if source is not None:
        feeds = source.first().feeds
    else:
        feeds = synthetic_sample(specs).feeds
        nonfinite = _check_synthetic_sample(model, specs, feeds)
    feeds = _as_input_types(converted, feeds)

    def verify(staged: bytes | str) -> None:
        verify_model(staged, feeds, nonfinite_in_float=nonfinite)

    if external:
        with _timed(timings, "save"):  # the model is verified in place before the rename
            model_io.save_with_external_data(converted, output, verify=verify)
        converted_for_compare: bytes | str = str(output)
    else:
        with _timed(timings, "verify"):
            converted_bytes = model_io.to_bytes(converted)
            verify(converted_bytes)
        with _timed(timings, "save"):
            model_io.write_atomically(output, converted_bytes)
        converted_for_compare = converted_bytes

    comparison = None
    if evaluation is not None:
        with (
            _timed(timings, "evaluate"),
            progress.task("Evaluating", len(evaluation)) as advance,
        ):
            comparison = _evaluate(model, output, converted_for_compare, evaluation, advance)
    result = Report(
        command="quantize",
        model=str(model),
        output=str(output),
        conversion=Conversion.from_plan(
            plan,
            opsets=(opset_before, converted.opset_imports.get("", 1)),
            sizes=(model_io.file_size(model), model_io.file_size(output)),
            samples=calibration.samples if calibration is not None else 0,
            range_methods=_used_choices(range_choices, plan),
        ),
        comparison=comparison,
        seconds=timings,
    )
    if report is not None:
        result.write(report)
    return result


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


def _check_weight_passes(config: QuantizeConfig, data, calib) -> None:
    for flag, wanted in (
        ("--equalize", config.equalize),
        ("--bias-correction", config.bias_correction),
        ("--adaround", config.adaround),
        ("--smooth-quant", config.smooth_quant is not None),
    ):
        if wanted and calib is not None:
            raise ConfigError(
                f"{flag} does not go with --calib: the file holds statistics of the model "
                "as it was, not as the pass changes it.",
                hint="pass --data DIR to calibrate the changed model now.",
            )
    needs_data = {
        "--bias-correction": config.bias_correction,
        "--adaround": config.adaround,
        "--smooth-quant": config.smooth_quant is not None,
    }
    if any(needs_data.values()) and data is None:
        flag = next(name for name, wanted in needs_data.items() if wanted)
        raise ConfigError(
            f"{flag} needs --data DIR: it measures the activations on samples.",
        )


def _equalize(float_model: ir.Model) -> tuple[ir.Model, tuple[str, ...]]:
    """The model prepared at its own opset and cross-layer equalized, and a note."""
    prepared = prepare(float_model, min_opset=1)
    equalize = EqualizePass()
    equalize(prepared)
    pairs = ", ".join(f"{p.first}->{p.second}" for p in equalize.pairs) or "none found"
    note = (
        f"Cross-layer equalization: {len(equalize.pairs)} Conv pair(s) rescaled so each "
        f"channel's weight ranges match ({pairs}); pairs joined by a Clip (ReLU6) are not "
        "scale-equivariant and were left alone."
    )
    return prepared, (note,)


def _smooth(
    float_model: ir.Model, source: DirectorySource, alpha: float
) -> tuple[ir.Model, tuple[str, ...]]:
    """The model prepared at its own opset with SmoothQuant applied, and a note."""
    prepared = prepare(float_model, min_opset=1)
    sites = smooth_sites(prepared)
    names = [site.tensor for site in sites]
    changed = 0
    if names:
        proto = onnx.load_model_from_string(model_io.to_bytes(prepared))
        session = make_session(expose(proto, names), quiet=True)
        runs = (
            dict(zip(names, session.run(names, sample.feeds), strict=True))
            for sample in source
        )
        changed = smooth(sites, channel_absmax(runs, names), alpha)
    note = (
        f"SmoothQuant (alpha {alpha:g}): {changed} LayerNormalization output(s) had their "
        "per-channel outliers moved into the MatMul weights that read them."
    )
    return prepared, (note,)


def _float_runs(prepared: ir.Model, names, source: DirectorySource):
    """The named tensors of the float `prepared` model, one dict per sample of `source`."""
    inputs = {value.name for value in prepared.graph.inputs}
    exposed = [name for name in names if name not in inputs]
    proto = onnx.load_model_from_string(model_io.to_bytes(prepared))
    session = make_session(expose(proto, exposed), quiet=True)
    for sample in source:
        # run(None) would return every output: ask only when there is a tensor to see
        outputs = session.run(exposed, sample.feeds) if exposed else []
        values = dict(zip(exposed, outputs, strict=True))
        values.update({n: a for n, a in sample.feeds.items() if n in names})
        yield values


def _adaround(
    prepared: ir.Model, plan: QuantPlan, source: DirectorySource, originals: dict
) -> QuantPlan:
    """Rounds the weights of `plan`'s MatMul/Gemm nodes in `prepared` (passes.adaround)."""
    nodes = adaround_nodes(prepared, plan)
    names = sorted({node.inputs[0].name for node in nodes})
    grams = gram_matrices(_float_runs(prepared, names, source), names) if names else {}
    rounded = adaround(plan, nodes, grams, originals)
    gains = [
        10 * math.log10(r.error_before / r.error_after)
        for r in rounded
        if r.error_after > 0 and r.error_before > 0
    ]
    note = (
        f"Adaptive rounding: {len(rounded)} MatMul/Gemm weight(s) rounded to minimise "
        f"their layer's output error on {len(source)} calibration samples (layer error "
        f"down {max(gains, default=0.0):.1f} dB at best, {min(gains, default=0.0):.1f} dB "
        "at least)."
    )
    return dataclasses.replace(plan, notes=(*plan.notes, note))


def _correct_biases(
    prepared: ir.Model, plan: QuantPlan, source: DirectorySource, originals: dict
) -> QuantPlan:
    """Shifts the biases of `plan`'s Conv/Gemm nodes in `prepared` (bias_correct)."""
    nodes = correctable_nodes(prepared, plan)
    axes = {node.inputs[0].name: input_axis(node) for node in nodes}
    runs = _float_runs(prepared, list(axes), source)
    corrections = correct_biases(plan, nodes, channel_means(runs, axes), originals)
    largest = max((c.max_abs_shift for c in corrections), default=0.0)
    note = (
        f"Bias correction: {len(corrections)} Conv/Gemm bias(es) shifted by the mean error "
        f"their quantized weights make on {len(source)} calibration samples (largest "
        f"shift {largest:.3g})."
    )
    return dataclasses.replace(plan, notes=(*plan.notes, note))


def _check_mixed_precision(
    config: QuantizeConfig, target: Target, data, eval_data
) -> None:
    if config.scheme not in ("int8", "16x8") or config.format is not Format.QDQ:
        raise ConfigError(
            f"--target-sqnr/--max-top1-drop do not go with --scheme {config.scheme} "
            f"--format {config.format.value}.",
            hint="mixed precision keeps nodes of a static QDQ model float: use --scheme "
            "int8 or 16x8 with --format qdq.",
        )
    if target.max_top1_drop is not None and eval_data is None:
        raise ConfigError(
            "--max-top1-drop needs --eval DIR with labels.npy.",
            hint="or use --target-sqnr DB, which needs no labels.",
        )
    if eval_data is not None and target.max_top1_drop is not None:
        if folder_labels(eval_data) is None:
            raise ConfigError(
                f"--max-top1-drop needs labels: '{eval_data}' has no labels.npy.",
                hint="put labels.npy (one integer per sample) in the --eval folder.",
            )
    if data is None and eval_data is None:
        raise ConfigError(
            "--target-sqnr needs samples to measure on: pass --eval DIR or --data DIR.",
            hint="with --calib, add --eval DIR.",
        )


MIXED_PRECISION_SAMPLES = 32
"""Samples each mixed-precision evaluation runs: enough for a stable SQNR, few enough to
score dozens of variants in seconds."""


def _plan_for(prepared, scheme, config, selection, ranges):
    def plan_for(excluded: frozenset[str]) -> QuantPlan:
        return make_plan(
            prepared,
            scheme,
            ranges,
            excluded=excluded,
            selection=selection,
            overrides=config.overrides,
        )

    return plan_for


def _evaluator(model: PathLike, prepared: ir.Model, source: DirectorySource, samples: int):
    """Scores variants on the first `samples` samples of `source` (and their labels)."""
    chosen = [sample.feeds for sample in itertools.islice(source, samples)]
    labels_path = folder_labels(source.folder)
    labels = load_labels(labels_path, len(source))[: len(chosen)] if labels_path else None
    return Evaluator(str(model), prepared, chosen, labels=labels)


def _mixed_precision(
    model, prepared, scheme, config, selection, ranges, source, target, advance
) -> QuantPlan:
    """The plan with the nodes `sensitivity.choose_float_nodes` keeps float, and notes."""
    evaluator = _evaluator(model, prepared, source, MIXED_PRECISION_SAMPLES)
    plan_for = _plan_for(prepared, scheme, config, selection, ranges)
    plan, result = choose_float_nodes(plan_for, evaluator, target, on_node=advance)
    kept = {node.name: node for node in result.kept_float}
    nodes = tuple(
        dataclasses.replace(
            node,
            reason=f"kept float by mixed precision: quantized alone it gives "
            f"{kept[node.name].sqnr_db:.1f} dB output SQNR",
        )
        if node.name in kept
        else node
        for node in plan.nodes
    )
    notes = [_mixed_note(result, len(evaluator.samples), _float_weight_bytes(prepared, kept))]
    return dataclasses.replace(plan, nodes=nodes, notes=(*plan.notes, *notes))


def _float_weight_bytes(model: ir.Model, names) -> int:
    """Bytes the weights of the named nodes take in float32 beyond int8 (3 per value)."""
    total = 0
    for node in model.graph:
        if node.name in names:
            for value in node.inputs[1:2]:
                if value is not None and value.const_value is not None:
                    total += value.const_value.nbytes * 3 // 4
    return total


def _mixed_note(result: MixedPrecision, samples: int, extra_bytes: int) -> str:
    def score(s: Score) -> str:
        text = f"{s.sqnr_db:.1f} dB"
        if s.top1_drop_points is not None:
            text += f", top-1 drop {s.top1_drop_points:.1f} points"
        return text

    wanted = []
    if result.target.sqnr_db is not None:
        wanted.append(f"SQNR >= {result.target.sqnr_db:g} dB")
    if result.target.max_top1_drop is not None:
        wanted.append(f"top-1 drop <= {result.target.max_top1_drop:g} points")
    names = ", ".join(node.name for node in result.kept_float) or "none"
    verdict = "reached" if result.reached else "NOT reached even with them float"
    return (
        f"Mixed precision ({' and '.join(wanted)} on {samples} samples): "
        f"{score(result.before)} fully quantized; kept {len(result.kept_float)} node(s) "
        f"float ({names}): {score(result.after)}; target {verdict}. Keeping them float "
        f"costs {extra_bytes} bytes of float32 weights{_latency_cost(result)}."
    )


def _latency_cost(result: MixedPrecision) -> str:
    if result.latency_ms is None:
        return ""
    full, mixed = result.latency_ms
    return (
        f" and latency: {mixed:.3g} ms against {full:.3g} ms fully quantized "
        f"({mixed / full:.2f}x; 1 thread, median of 30 runs on one sample)"
    )


def _derive_ranges(
    calibration: Calibration, method: RangeMethod
) -> tuple[dict, dict[str, str]]:
    """The ranges of every calibrated tensor, and for `auto` the method chosen for each."""
    if method.name != "auto":
        return dict(derive_ranges(calibration.observers, method)), {}
    choices = choose_ranges(calibration.observers, method)
    ranges = {name: choice.range for name, choice in choices.items()}
    return ranges, {name: choice.method for name, choice in choices.items()}


def _used_choices(choices: dict[str, str], plan: QuantPlan) -> dict[str, str]:
    """The `auto` choices of the tensors the plan quantizes as activations."""
    return {
        name: choices[name]
        for name, decision in plan.tensors.items()
        if name in choices and decision.role.value == "activation"
    }


def _prepare(model: ir.Model, config: QuantizeConfig) -> tuple[ir.Model, str]:
    """Prepares the model; returns it and the domain its Q/DQ nodes go in.

    int16 Q/DQ need ai.onnx opset 21. When the ONNX converter cannot raise the model that
    far, onnxruntime's com.microsoft Q/DQ (int16 at any opset) are used instead.
    """
    target = config.target_opset
    try:
        return prepare(model, min_opset=target), ""
    except UnsupportedModelError:
        scheme_asked_21 = config.opset is None and config.min_opset == INT16_MIN_OPSET
        if not (target == INT16_MIN_OPSET and scheme_asked_21):
            raise
    logger.warning(
        "The model cannot be upgraded to opset %d; writing int16 Q/DQ in the %s domain.",
        INT16_MIN_OPSET,
        _MICROSOFT,
    )
    return prepare(model, min_opset=13), _MICROSOFT


def _plan(
    model: ir.Model,
    scheme: StaticScheme | DynamicScheme | Float16Scheme,
    config: QuantizeConfig,
    selection: NodeSelection,
    ranges: dict,
    peaks: dict[str, float],
) -> QuantPlan:
    if isinstance(scheme, StaticScheme):
        plan = make_plan(
            model, scheme, ranges, selection=selection, overrides=config.overrides
        )
        return dataclasses.replace(plan, format=config.format.value)
    if isinstance(scheme, DynamicScheme):
        return make_dynamic_plan(
            model, scheme, selection=selection, overrides=config.overrides
        )
    return make_float16_plan(
        model, scheme, selection=selection, overrides=config.overrides, peaks=peaks
    )


def _rewrite(
    model: ir.Model, plan: QuantPlan, config: QuantizeConfig, qdq_domain: str
) -> ir.Model:
    scheme = plan.scheme
    if isinstance(scheme, StaticScheme):
        passes = [InsertQDQPass(plan=plan, domain=qdq_domain), FloatInputsPass(plan=plan)]
        if config.format is Format.QOP:
            passes.append(QDQToQOperatorPass())
    elif isinstance(scheme, DynamicScheme):
        passes = [DynamicQuantizePass(plan=plan)]
    elif scheme.storage_only:
        passes = [StoreWeightsAsFloat16Pass(plan=plan)]
    else:
        passes = [CastToFloat16Pass(plan=plan, keep_io_types=scheme.keep_io_types)]
    return ir.passes.PassManager(passes)(model).model


def _with_notes(
    plan: QuantPlan,
    config: QuantizeConfig,
    opset_before: int,
    prepared: ir.Model,
    qdq_domain: str,
) -> QuantPlan:
    """Adds what the report must say about opsets, domains and speed."""
    notes = list(plan.notes)
    opset_after = prepared.opset_imports.get("", 1)
    if opset_after != opset_before:
        notes.append(
            f"The model was upgraded from opset {opset_before} to {opset_after} with the "
            "ONNX version converter."
        )
    int16 = any(decision.qparams.dtype.itemsize == 2 for decision in plan.tensors.values())
    if int16:
        where = (
            f"onnxruntime's {_MICROSOFT} QuantizeLinear/DequantizeLinear (the upgrade to "
            f"opset {INT16_MIN_OPSET} failed)"
            if qdq_domain
            else f"standard ai.onnx QuantizeLinear/DequantizeLinear at opset {opset_after}"
        )
        notes.append(f"int16 activations use {where}.")
        notes.append(
            "onnxruntime has no int16 kernels on CPU: it dequantizes around every op, so "
            "16x8 runs slower than float there. It buys size and accuracy, not CPU speed."
        )
    if config.format is Format.QOP:
        notes.append(
            "qop: Conv, MatMul and Gemm groups are written as QLinearConv, QLinearMatMul "
            f"and {_MICROSOFT} QGemm; groups that do not fit stay QDQ."
        )
    return dataclasses.replace(plan, notes=tuple(notes))


def _as_input_types(model: ir.Model, feeds: Feeds) -> Feeds:
    """The feeds cast to the converted model's input types (float16 without keep-io)."""
    dtypes = {value.name: value.dtype for value in model.graph.inputs}
    return {
        name: array.astype(dtypes[name].numpy())
        if dtypes.get(name) is not None and dtypes[name].numpy() != array.dtype
        else array
        for name, array in feeds.items()
    }


def _tensor_bytes(model: ir.Model) -> int:
    return sum(
        value.const_value.nbytes
        for value in model.graph.initializers.values()
        if value.const_value is not None
    )


def calibrate(
    model: PathLike,
    data: PathLike,
    *,
    output: PathLike | None = None,
    samples: int | None = None,
    seed: int = 0,
    batch_size: int = 1,
    images: ImagePreprocessing | None = None,
    trt_cache: PathLike | None = None,
    trt_method: RangeMethod = _TRT_METHOD,
    workers: int = 1,
    ray: RayCluster | None = None,
    tensors_per_pass: int | None = None,
    force: bool = False,
    progress: Progress = SILENT,
    limits: LoadLimits = DEFAULT_LIMITS,
) -> Calibration:
    """Runs `model` on the samples of `data` and returns (and writes) their statistics.

    One calibration serves every range method and every scheme: `quantize(calib=...)`
    derives the ranges from it.

    Args:
        model: the float ONNX model; it is only read.
        data: a folder of samples, in any layout `qconvert.dataset` reads.
        output: the calibration file to write (JSON); None writes nothing.
        samples: use a random subset of this many samples (reproducible from `seed`).
        seed: the seed of that subset.
        batch_size: samples per onnxruntime run; needs a dynamic batch dim.
        images: the preprocessing of an image folder.
        trt_cache: also write the ranges as a TensorRT calibration cache here.
        trt_method: the range method of that cache.
        workers: split the samples over this many local processes (or, with `ray`, this
            many Ray tasks; 1 there means one per CPU of the cluster). The statistics are
            the same however the work is split; `Calibration.split` says how it was.
            Local workers are spawned: a script that calls this needs the usual
            `if __name__ == "__main__":` guard.
        ray: run the shards on this Ray cluster (needs `pip install qconvert[ray]`).
        tensors_per_pass: expose at most this many tensors per pass over the data, to
            bound memory on big graphs (same statistics, one pass per group).
        force: overwrite existing output files.
        progress: receives progress, one step per sample and pass.
        limits: bounds the model must respect before its weights are read.
    """
    if workers < 1:
        raise ConfigError(f"--workers {workers} must be at least 1.")
    outputs = [Path(p) for p in (output, trt_cache) if p is not None]
    for path in outputs:
        model_io.check_output_path(path, force=force)
    float_model = model_io.load_model(model, limits)
    specs = input_specs(float_model)
    if batch_size > 1:
        static = [spec.name for spec in specs if not spec.dims or spec.dims[0] is not None]
        if static:
            raise ConfigError(
                f"--batch-size {batch_size} needs a dynamic batch dim, but input "
                f"'{static[0]}' has a static one.",
                hint="use --batch-size 1 for this model.",
            )
    source = DirectorySource(data, specs, images=images, limits=limits)
    if samples is not None:
        source = source.subset(samples, seed=seed)
    settings = CollectSettings(batch_size=batch_size, tensors_per_pass=tensors_per_pass)
    data_spec = DataSpec(
        folder=str(data), specs=specs, images=images, samples=samples, seed=seed
    )
    calibrated = prepare(float_model, min_opset=1)  # no copy: nothing else reads it
    tensors = tensors_to_calibrate(calibrated)
    total = len(source) * pass_count(len(tensors), settings)
    with progress.task("Calibrating", total) as advance:
        observers, split = collect_split(
            calibrated,
            source,
            tensors,
            settings=settings,
            data=data_spec,
            workers=workers,
            ray=ray,
            advance=advance,
        )
    calibration = Calibration(
        model_sha256=model_io.fingerprint(model),
        model_file=Path(model).name,
        samples=len(source),
        observers=observers,
        split=split,
    )
    if output is not None:
        model_io.write_atomically(Path(output), calibration.to_json().encode("utf-8"))
    if trt_cache is not None:
        ranges = derive_ranges(calibration.observers, trt_method)
        write_trt_cache(Path(trt_cache), ranges, method=trt_method.name)
    return calibration


def merge(
    calibrations: list[PathLike], output: PathLike | None = None, *, force: bool = False
) -> Calibration:
    """Merges calibration files of parts of a data set: the same as one run over all."""
    if len(calibrations) < 2:
        raise ConfigError("--merge needs at least two calibration files.")
    if output is not None:
        model_io.check_output_path(output, force=force)
    merged = merge_calibrations([(str(p), read_calibration(p)) for p in calibrations])
    if output is not None:
        model_io.write_atomically(Path(output), merged.to_json().encode("utf-8"))
    return merged


def _measurable(value: ir.Value) -> bool:
    # Scalars (often shape arithmetic) cannot be bound as calibration outputs, and cannot
    # hold a layer's activations anyway.
    return (
        value.dtype == ir.DataType.FLOAT and value.shape is not None and len(value.shape) > 0
    )


def _check_synthetic_sample(
    model: PathLike, specs: tuple[InputSpec, ...], feeds: dict[str, np.ndarray]
) -> frozenset[str]:
    """Runs the float model on the zeros qconvert verifies with when no data is given.

    Returns the outputs that are already NaN or Inf in float (all-zero attention masks do
    that), which verification then does not hold against the converted model.

    Raises:
        UnsupportedModelError: the float model cannot run on them (dynamic dims set to 1
            do not fit it), naming the dynamic inputs and the options that help.
    """
    try:
        session = make_session(str(model), quiet=True)
        outputs = session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class
        dynamic = [spec for spec in specs if any(d is None for d in spec.dims)]
        if not dynamic:
            raise UnsupportedModelError(
                f"Model '{model}' does not run on zeros of its input shapes, the smoke "
                f"sample used without data: {describe_error(exc)}",
                hint="pass --data DIR with real samples.",
            ) from None
        example = dynamic[0]
        dims = "x".join("1" if d is None else str(d) for d in example.dims)
        raise UnsupportedModelError(
            f"Model '{model}' does not run on the smoke sample used without data (zeros, "
            f"with the dynamic dims of {', '.join(repr(s.name) for s in dynamic)} set to "
            f"1): {describe_error(exc)}",
            hint=f"pass --data DIR, or fix the dims with --input-shape "
            f"{example.name}:{dims} (with the sizes the model takes).",
        ) from None
    return frozenset(
        meta.name
        for meta, array in zip(session.get_outputs(), outputs, strict=True)
        if np.issubdtype(np.asarray(array).dtype, np.floating) and not np.isfinite(array).all()
    )


def _float16_peaks(float_model, source: DirectorySource, advance) -> dict[str, float]:
    """The largest magnitude each float32 tensor computed by a node reaches on `source`."""
    measured = prepare(float_model.clone(), min_opset=1)
    names = [
        value.name
        for node in measured.graph
        for value in node.outputs
        if value.name and _measurable(value)
    ]
    names += [value.name for value in measured.graph.inputs if _measurable(value)]
    observers = collect_statistics(
        measured,
        source,
        names,
        settings=CollectSettings(histogram_values=0),
        on_sample=advance,
    )
    return {
        name: max(abs(observer.min), abs(observer.max))
        for name, observer in observers.items()
        if observer.count
    }


def _calibrate(
    path: PathLike,
    float_model,
    source: DirectorySource,
    settings: CollectSettings,
    advance,
) -> Calibration:
    """Statistics of `float_model` on `source`.

    Calibration runs the model prepared at its own opset (names fixed, BatchNormalization
    folded): the tensors are those every scheme plans with, whatever opset it then needs.
    """
    calibrated = prepare(float_model.clone(), min_opset=1)
    observers = collect_statistics(
        calibrated,
        source,
        tensors_to_calibrate(calibrated),
        settings=settings,
        on_sample=advance,
    )
    return Calibration(
        model_sha256=model_io.fingerprint(path),
        model_file=Path(path).name,
        samples=len(source),
        observers=observers,
    )


def compare(
    reference: PathLike | None,
    candidate: PathLike,
    *,
    data: PathLike,
    labels: PathLike | None = None,
    gates: Gates = NO_GATES,
    check_finite: bool = False,
    providers: tuple[str, str] = ("cpu", "cpu"),
    latency: LatencyConfig | None = None,
    per_layer: bool = False,
    save_outputs: PathLike | None = None,
    load_outputs: PathLike | None = None,
    report: PathLike | None = None,
    progress: Progress = SILENT,
    limits: LoadLimits = DEFAULT_LIMITS,
) -> Report:
    """Runs `reference` and `candidate` on the samples in `data` and measures the difference.

    Args:
        reference: the model to compare against; None when `load_outputs` stands in for it.
        candidate: the model under test (quantized, fp16, another variant).
        data: a folder of samples both models accept.
        labels: a `.npy` of one integer label per sample (default: `labels.npy` in `data`).
        gates: thresholds to check; the report says which failed (`Report.failed_gates`).
        check_finite: fail with `AccuracyGateError` on the first NaN or Inf in any output.
        providers: onnxruntime execution providers of the reference and the candidate.
        latency: measure median and p90 latency as configured (None: do not, unless a
            latency gate is set).
        per_layer: also compare matching intermediate tensors, worst layer first.
        save_outputs: write the reference's outputs to this file, for `load_outputs` later.
        load_outputs: a file written by `save_outputs`, used in place of the reference.
        report: a file to write the report to (`.json`, `.md` or `.html`).
        progress: receives progress of the comparison.
        limits: bounds the model must respect before its weights are read.

    Returns:
        The report, with the comparison and the gate results.
    """
    if report is not None:
        check_report_path(report)
    if (reference is None) == (load_outputs is None):
        raise ConfigError("Give either a reference model or --load-outputs FILE, not both.")
    if load_outputs is not None and per_layer:
        raise ConfigError("--per-layer needs the reference model, not --load-outputs.")
    if load_outputs is not None and save_outputs is not None:
        raise ConfigError("--save-outputs needs the reference model, not --load-outputs.")
    if save_outputs is not None and not Path(save_outputs).parent.is_dir():
        raise OutputError(f"Outputs folder '{Path(save_outputs).parent}' does not exist.")
    reference_provider, candidate_provider = (resolve_provider(p) for p in providers)
    if gates.needs_latency and latency is None:
        latency = LatencyConfig()
    timings: dict[str, float] = {}

    with _timed(timings, "load"):
        candidate_model = model_io.load_model(candidate, limits)
        if load_outputs is not None:
            saved = SavedOutputs(load_outputs)
            check_interfaces(saved, candidate_model, names=(str(load_outputs), str(candidate)))
            reference_side: Side | SavedOutputs = saved
            specs = input_specs(candidate_model)
        else:
            reference_model = model_io.load_model(reference, limits)
            check_interfaces(
                reference_model, candidate_model, names=(str(reference), str(candidate))
            )
            reference_side = Side(
                model=str(reference),
                path=str(reference),
                bytes=model_io.file_size(reference),
                provider=reference_provider,
            )
            specs = input_specs(reference_model)
        source = DirectorySource(data, specs, limits=limits)
        candidate_source = DirectorySource(data, input_specs(candidate_model), limits=limits)
        labels_path = Path(labels) if labels is not None else folder_labels(data)
        label_values = load_labels(labels_path, len(source)) if labels_path else None
        if gates.needs_labels and label_values is None:
            raise ConfigError(
                "--max-top1-drop needs labels.",
                hint=f"put labels.npy in '{data}' or pass --labels FILE.",
            )
    options = CompareOptions(
        labels=label_values,
        labels_path=str(labels_path) if label_values is not None else None,
        check_finite=check_finite,
        per_layer=per_layer,
        latency=latency,
        save_outputs=Path(save_outputs) if save_outputs is not None else None,
    )
    candidate_side = Side(
        model=str(candidate),
        path=str(candidate),
        bytes=model_io.file_size(candidate),
        provider=candidate_provider,
    )
    with _timed(timings, "compare"), progress.task("Comparing", len(source)) as advance:
        comparison = compare_models(
            reference_side,
            candidate_side,
            _checked_for_both(source, candidate_source, str(candidate)),
            len(source),
            options=options,
            on_sample=advance,
        )
    result = Report(
        command="compare",
        model=comparison.reference.path,
        output=None,
        comparison=comparison,
        gates=check_gates(gates, comparison),
        seconds=timings,
    )
    if report is not None:
        result.write(report)
    return result


def analyze(
    model: PathLike,
    *,
    data: PathLike,
    samples: int = 16,
    method: str = "minmax",
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
    with progress.task("Calibrating", len(source)) as advance:
        calibration = _calibrate(model, float_model, source, CollectSettings(), advance)
    prepared, _ = _prepare(float_model, config)
    range_method = RangeMethod(
        name=method, bits=scheme.activation_dtype.itemsize * 8
    )
    ranges, _ = _derive_ranges(calibration, range_method)
    selection = NodeSelection(exclude=config.exclude, include_only=config.include_only)
    plan_for = _plan_for(prepared, scheme, config, selection, ranges)
    evaluator = _evaluator(model, prepared, source, samples)
    count = len(quantizable_nodes(plan_for(frozenset())))
    with progress.task("Ranking nodes", count) as advance:
        return _analyze(str(model), plan_for, evaluator, advance)


def inspect(model: PathLike, *, limits: LoadLimits = DEFAULT_LIMITS) -> ModelSummary:
    """Summarizes `model`: interface, opsets, ops, parameters and quantizable nodes."""
    return summarize(model_io.load_model(model, limits))


def _evaluate(
    model: PathLike,
    output: Path,
    converted: bytes | str,
    evaluation: DirectorySource,
    advance: Callable[[], None],
) -> Comparison:
    """Compares the float model with the converted one just written.

    `converted` is the serialized model, or its path when it was saved with external data.
    """
    labels_path = folder_labels(evaluation.folder)
    labels = load_labels(labels_path, len(evaluation)) if labels_path else None
    return compare_models(
        Side(model=str(model), path=str(model), bytes=model_io.file_size(model)),
        Side(model=converted, path=str(output), bytes=model_io.file_size(output)),
        evaluation,
        len(evaluation),
        options=CompareOptions(
            labels=labels, labels_path=str(labels_path) if labels_path else None
        ),
        on_sample=advance,
    )


def _checked_for_both(
    source: DirectorySource, candidate_source: DirectorySource, candidate: str
) -> Iterator[Sample]:
    """The samples of `source`, each also checked against the candidate's inputs."""
    candidate_samples = iter(candidate_source)
    for sample in source:
        try:
            next(candidate_samples)
        except CalibrationDataError as exc:
            raise CalibrationDataError(
                f"{exc.message.rstrip('.')} (the candidate '{candidate}').", hint=exc.hint
            ) from None
        yield sample




@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - start, 4)


__all__ = ["analyze", "calibrate", "compare", "inspect", "merge", "quantize"]
