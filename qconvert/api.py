"""The Python API: one function per verb, each returning a `Report`.

The command line is a thin layer over these functions. Each runs its pipeline as a visible
list of stages: load -> prepare -> calibrate -> plan -> rewrite -> verify -> save -> evaluate.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qconvert import model as model_io
from qconvert.model import LoadLimits
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
from qconvert.passes import (
    CastToFloat16Pass,
    DropIntermediateShapesPass,
    DynamicQuantizePass,
    InsertQDQPass,
    QDQToQOperatorPass,
    StoreWeightsAsFloat16Pass,
    prepare,
)
from qconvert.plan import QuantPlan, make_dynamic_plan, make_float16_plan, make_plan
from qconvert.progress import SILENT, Progress
from qconvert.report import Conversion, Report, check_report_path
from qconvert.runtime import describe_error, make_session, resolve_provider
from qconvert.saved_outputs import SavedOutputs
from qconvert.schemes import INT16_MIN_OPSET, DynamicScheme, Float16Scheme, StaticScheme
from qconvert.selection import NodeSelection
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
    report: PathLike | None = None,
    force: bool = False,
    progress: Progress = SILENT,
    limits: LoadLimits = LoadLimits(),
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
        method: how ranges are derived from the statistics: minmax, percentile, entropy
            or mse (see `qconvert.calibration.ranges`).
        percentile: the share of values kept by the percentile method, in percent.
        images: the preprocessing of image folders (`data` and `eval_data`).
        config: scheme, format and controls; `QuantizeConfig()` is int8 QDQ.
        eval_data: a folder of evaluation samples (with `labels.npy` for accuracy): the
            float and quantized models are compared on it and the result goes in the report.
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
            hint="int8-dynamic, fp16 and fp16-weights need none.",
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
            DirectorySource(data, specs, images=images) if calibrating or measuring else None
        )
        calibration = None
        if scheme.needs_calibration and calib is not None:
            calibration = read_calibration(calib)
            calibration.check_model(model_io.fingerprint(model), calib, str(model))
        evaluation = (
            DirectorySource(eval_data, specs, images=images) if eval_data is not None else None
        )
    if isinstance(scheme, StaticScheme | DynamicScheme) and not scheme.reduce_range:
        if lacks_vnni():
            logger.warning(
                "This CPU lacks VNNI: onnxruntime's u8 x s8 kernels can saturate here. "
                "Pass --reduce-range (7-bit weights) for models that will run on it."
            )
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
    if calibration is not None and range_method is not None:
        with _timed(timings, "ranges"):
            ranges = derive_ranges(calibration.observers, range_method)
    with _timed(timings, "plan"):
        plan = _plan(prepared, scheme, config, selection, ranges, peaks)
        plan = _with_notes(plan, config, opset_before, prepared, qdq_domain)
    with _timed(timings, "rewrite"):
        converted = _rewrite(prepared, plan, config, qdq_domain)
        DropIntermediateShapesPass()(converted)
        converted.producer_name = "qconvert"
    if source is None and data is not None:  # data a scheme does not calibrate on
        source = DirectorySource(data, specs, images=images)
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
        ),
        comparison=comparison,
        seconds=timings,
    )
    if report is not None:
        result.write(report)
    return result


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
    force: bool = False,
    progress: Progress = SILENT,
    limits: LoadLimits = LoadLimits(),
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
        force: overwrite existing output files.
        progress: receives progress, one step per sample.
        limits: bounds the model must respect before its weights are read.
    """
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
    source = DirectorySource(data, specs, images=images)
    if samples is not None:
        source = source.subset(samples, seed=seed)
    settings = CollectSettings(batch_size=batch_size)
    with progress.task("Calibrating", len(source)) as advance:
        calibration = _calibrate(model, float_model, source, settings, advance)
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
    limits: LoadLimits = LoadLimits(),
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
        source = DirectorySource(data, specs)
        candidate_source = DirectorySource(data, input_specs(candidate_model))
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


def inspect(model: PathLike, *, limits: LoadLimits = LoadLimits()) -> ModelSummary:
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


__all__ = ["calibrate", "compare", "inspect", "merge", "quantize"]
