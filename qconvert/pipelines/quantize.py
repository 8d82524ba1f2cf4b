"""`quantize`: load -> prepare -> calibrate -> plan -> rewrite -> verify -> save -> evaluate.

Each stage is timed into the report; the weight passes and mixed precision, when asked
for, run between planning and rewriting (`weight_passes`, `mixed_precision`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from qconvert import model as model_io
from qconvert.calibration import (
    CollectSettings,
    RangeMethod,
    read_calibration,
)
from qconvert.calibration.parallel import DataSpec
from qconvert.compare import (
    CompareOptions,
    Comparison,
    Side,
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
    input_specs,
    synthetic_sample,
)
from qconvert.errors import (
    ConfigError,
    UnsupportedModelError,
)
from qconvert.limits import DEFAULT_LIMITS, LoadLimits
from qconvert.passes import (
    CastToFloat16Pass,
    DropIntermediateShapesPass,
    DynamicQuantizePass,
    InsertQDQPass,
    QDQToQOperatorPass,
    StoreWeightsAsFloat16Pass,
)
from qconvert.pipelines.auto_check import AUTO_CHECK_SAMPLES, check_against_minmax
from qconvert.pipelines.calibrate import collect_calibration, float16_peaks
from qconvert.pipelines.mixed_precision import (
    check_mixed_precision,
    evaluator_on,
    plan_mixed_precision,
)
from qconvert.pipelines.stages import (
    MICROSOFT_DOMAIN,
    PathLike,
    prepare_for_scheme,
    ranges_of,
    timed,
)
from qconvert.pipelines.weight_passes import (
    adaround_weights,
    check_weight_passes,
    correct_biases_of,
    equalize_model,
    smooth_model,
)
from qconvert.plan import QuantPlan, make_dynamic_plan, make_float16_plan, make_plan
from qconvert.progress import SILENT, Progress
from qconvert.report import Conversion, Report, check_report_path
from qconvert.runtime import describe_error, make_session
from qconvert.schemes import INT16_MIN_OPSET, DynamicScheme, Float16Scheme, StaticScheme
from qconvert.selection import NodeSelection
from qconvert.sensitivity import (
    Target,
    quantizable_nodes,
)
from qconvert.verify import verify_model

logger = logging.getLogger("qconvert")


CALIBRATION_LIMIT = model_io.PROTOBUF_LIMIT
"""The most bytes of weights a model may hold to be calibrated: the calibration stage hands
onnxruntime the model as one protobuf."""


def quantize(
    model: PathLike,
    output: PathLike,
    *,
    data: PathLike | None = None,
    calib: PathLike | None = None,
    method: str = "auto",
    percentile: float = 99.99,
    images: ImagePreprocessing | None = None,
    config: QuantizeConfig | None = None,
    eval_data: PathLike | None = None,
    target_sqnr: float | None = None,
    max_top1_drop: float | None = None,
    report: PathLike | None = None,
    force: bool = False,
    workers: int | None = 1,
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
        workers: calibrate `data` over this many local processes; None (`--workers
            auto`, the command line's default) starts alone and spawns more once the
            work proves long, as `calibrate` does. The model is the same however the work
            is split. Workers are spawned, which re-imports the calling script: it needs
            the usual `if __name__ == "__main__":` guard, so 1 is the default here.
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
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers} must be at least 1.")
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
        check_mixed_precision(config, target, data, eval_data)
    check_weight_passes(config, data, calib)
    output = model_io.check_output_path(output, force=force)
    if report is not None:
        check_report_path(report)
    timings: dict[str, float] = {}

    with timed(timings, "load"):
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
            DirectorySource(data, specs, images=images, limits=limits)
            if calibrating or measuring
            else None
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
        with timed(timings, "equalize"):
            float_model, equalize_notes = equalize_model(float_model)
    if isinstance(scheme, StaticScheme | DynamicScheme) and not scheme.reduce_range:
        if lacks_vnni():
            logger.warning(
                "This CPU lacks VNNI: onnxruntime's u8 x s8 kernels can saturate here. "
                "Pass --reduce-range (7-bit weights) for models that will run on it."
            )
    if config.smooth_quant is not None and source is not None:
        with timed(timings, "smooth"):
            float_model, smooth_notes = smooth_model(float_model, source, config.smooth_quant)
        equalize_notes = (*equalize_notes, *smooth_notes)
    peaks: dict[str, float] = {}
    if measuring:
        with (
            timed(timings, "calibrate"),
            progress.task("Measuring ranges", len(source)) as advance,
        ):
            peaks = float16_peaks(float_model, source, advance)
    elif source is not None:
        # minmax needs no histogram; skipping it makes on-the-fly calibration cheaper. The
        # other methods (auto, the default, too) histogram exactly as `calibrate` does, so
        # --data equals --calib.
        settings = CollectSettings()
        if method == "minmax":
            settings = CollectSettings(histogram_values=0)
        with timed(timings, "calibrate"):
            spec = DataSpec(folder=str(data), specs=specs, images=images, limits=limits)
            calibration = collect_calibration(
                model,
                float_model.clone(),
                source,
                settings,
                progress,
                data=spec,
                workers=workers,
            )
    selection = NodeSelection(exclude=config.exclude, include_only=config.include_only)
    with timed(timings, "prepare"):
        prepared, qdq_domain = prepare_for_scheme(float_model, config)
        selection.warn_unmatched(prepared.graph)
    ranges = {}
    range_choices: dict[str, str] = {}
    if calibration is not None and range_method is not None:
        with timed(timings, "ranges"):
            ranges, range_choices = ranges_of(calibration, range_method)
    with timed(timings, "plan"):
        plan = _plan(prepared, scheme, config, selection, ranges, peaks)
    if range_choices:
        with timed(timings, "auto check"):
            checks = source or evaluation
            checked = check_against_minmax(
                plan,
                ranges=ranges,
                choices=range_choices,
                calibration=calibration,
                method=range_method,
                plan_with=lambda other: _plan(
                    prepared, scheme, config, selection, other, peaks
                ),
                evaluator=evaluator_on(prepared, checks, AUTO_CHECK_SAMPLES)
                if checks is not None
                else None,
                samples_from="calibration" if checks is source else "evaluation",
            )
            plan, ranges, range_choices = checked.plan, checked.ranges, checked.choices
    if mixed:
        with (
            timed(timings, "mixed precision"),
            progress.task("Ranking nodes", len(quantizable_nodes(plan))) as advance,
        ):
            plan = plan_mixed_precision(
                prepared,
                scheme,
                config,
                selection,
                ranges,
                evaluation or source,
                target,
                advance,
            )
    originals: dict = {}
    if config.adaround and source is not None:
        with timed(timings, "adaround"):
            plan = adaround_weights(prepared, plan, source, originals)
    if config.bias_correction and source is not None:
        with timed(timings, "bias correction"):
            plan = correct_biases_of(prepared, plan, source, originals)
    with timed(timings, "plan"):
        plan = _with_notes(plan, config, opset_before, prepared, qdq_domain)
        plan = dataclasses.replace(plan, notes=(*equalize_notes, *plan.notes))
    with timed(timings, "rewrite"):
        converted = _rewrite(prepared, plan, config, qdq_domain)
        DropIntermediateShapesPass()(converted)
        converted.producer_name = "qconvert"
    if source is None and data is not None:  # data a scheme does not calibrate on
        source = DirectorySource(data, specs, images=images, limits=limits)
    converted_for_compare = _verify_and_save(
        converted,
        output,
        model=model,
        specs=specs,
        source=source,
        external=external,
        timings=timings,
    )

    comparison = None
    if evaluation is not None:
        with (
            timed(timings, "evaluate"),
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


def _verify_and_save(
    converted: ir.Model,
    output: Path,
    *,
    model: PathLike,
    specs: tuple[InputSpec, ...],
    source: DirectorySource | None,
    external: bool,
    timings: dict[str, float],
) -> bytes | str:
    """Verifies `converted` on one sample, then writes it; returns it for the comparison.

    The sample is the first of `source`, else zeros of the input shapes. The returned model
    is its bytes, or its path when it was saved with external data.
    """
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
        with timed(timings, "save"):  # the model is verified in place before the rename
            model_io.save_with_external_data(converted, output, verify=verify)
        return str(output)
    with timed(timings, "verify"):
        converted_bytes = model_io.to_bytes(converted)
        verify(converted_bytes)
    with timed(timings, "save"):
        model_io.write_atomically(output, converted_bytes)
    return converted_bytes


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


def _used_choices(choices: dict[str, str], plan: QuantPlan) -> dict[str, str]:
    """The `auto` choices of the tensors the plan quantizes as activations."""
    return {
        name: choices[name]
        for name, decision in plan.tensors.items()
        if name in choices and decision.role.value == "activation"
    }


def _plan(
    model: ir.Model,
    scheme: StaticScheme | DynamicScheme | Float16Scheme,
    config: QuantizeConfig,
    selection: NodeSelection,
    ranges: dict,
    peaks: dict[str, float],
) -> QuantPlan:
    if isinstance(scheme, StaticScheme):
        return make_plan(
            model,
            scheme,
            ranges,
            selection=selection,
            overrides=config.overrides,
            format=config.format.value,
        )
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
        passes = [InsertQDQPass(plan=plan, domain=qdq_domain)]
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
            f"onnxruntime's {MICROSOFT_DOMAIN} QuantizeLinear/DequantizeLinear (the upgrade "
            f"to opset {INT16_MIN_OPSET} failed)"
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
            f"and {MICROSOFT_DOMAIN} QGemm, Add, Mul, Concat, pooling, LeakyRelu, Sigmoid "
            f"and Softmax as {MICROSOFT_DOMAIN} QLinear operators; groups that do not fit "
            "stay QDQ."
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
