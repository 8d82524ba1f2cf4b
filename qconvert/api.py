"""The Python API: one function per verb, each returning a `Report`.

The command line is a thin layer over these functions. Each runs its pipeline as a visible
list of stages: load -> prepare -> calibrate -> plan -> rewrite -> verify -> save -> evaluate.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

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
from qconvert.dataset import (
    DirectorySource,
    ImagePreprocessing,
    Sample,
    input_specs,
    synthetic_sample,
)
from qconvert.errors import CalibrationDataError, ConfigError, OutputError
from qconvert.gates import NO_GATES, Gates, check_gates
from qconvert.inspection import ModelSummary, summarize
from qconvert.latency import LatencyConfig
from qconvert.passes import DropIntermediateShapesPass, InsertQDQPass, prepare
from qconvert.plan import make_plan
from qconvert.progress import SILENT, Progress
from qconvert.report import Conversion, Report, check_report_path
from qconvert.runtime import resolve_provider
from qconvert.saved_outputs import SavedOutputs
from qconvert.schemes import SCHEMES
from qconvert.verify import verify_model

PathLike = str | os.PathLike[str]
_TRT_METHOD = RangeMethod(name="entropy")  # TensorRT's own default calibrator


def quantize(
    model: PathLike,
    output: PathLike,
    *,
    data: PathLike | None = None,
    calib: PathLike | None = None,
    method: str = "minmax",
    percentile: float = 99.99,
    images: ImagePreprocessing | None = None,
    scheme: str = "int8",
    per_channel: bool = True,
    eval_data: PathLike | None = None,
    report: PathLike | None = None,
    force: bool = False,
    progress: Progress = SILENT,
) -> Report:
    """Quantizes `model` with calibration samples from `data` and writes `output`.

    Args:
        model: the float ONNX model; it is only read.
        output: where the quantized model goes (refused if it exists, unless `force`).
        data: a folder of calibration samples, calibrated on the fly.
        calib: a calibration file from `calibrate` (instead of `data`).
        method: how ranges are derived from the statistics: minmax, percentile, entropy
            or mse (see `qconvert.calibration.ranges`).
        percentile: the share of values kept by the percentile method, in percent.
        images: the preprocessing of image folders (`data` and `eval_data`).
        scheme: a name from `qconvert.schemes.SCHEMES`.
        per_channel: one weight scale per output channel (else one per tensor).
        eval_data: a folder of evaluation samples (with `labels.npy` for accuracy): the
            float and quantized models are compared on it and the result goes in the report.
        report: a file to write the report to (`.json`, `.md` or `.html`).
        force: overwrite an existing output.
        progress: receives progress of the long steps.

    Returns:
        The report: sizes, what was quantized and what was not, and the comparison.
    """
    if scheme not in SCHEMES:
        raise ConfigError(
            f"Unknown scheme '{scheme}'.", hint=f"choose from {', '.join(SCHEMES)}."
        )
    chosen = SCHEMES[scheme].with_options(per_channel=per_channel)
    range_method = RangeMethod(
        name=method, percentile=percentile, bits=chosen.activation_dtype.itemsize * 8
    )
    if (data is None) == (calib is None):
        raise ConfigError("Pass calibration data or a calibration file (one of the two).")
    output = model_io.check_output_path(output, force=force)
    if report is not None:
        check_report_path(report)
    timings: dict[str, float] = {}

    with _timed(timings, "load"):
        float_model = model_io.load_model(model)
        opset_before = float_model.opset_imports.get("", 1)
        specs = input_specs(float_model)
        source = DirectorySource(data, specs, images=images) if data is not None else None
        calibration = read_calibration(calib) if calib is not None else None
        if calibration is not None:
            calibration.check_model(model_io.fingerprint(model), calib, str(model))
        evaluation = (
            DirectorySource(eval_data, specs, images=images) if eval_data is not None else None
        )
    if source is not None:
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
    with _timed(timings, "prepare"):
        prepared = prepare(float_model, min_opset=chosen.min_opset)
    with _timed(timings, "ranges"):
        ranges = derive_ranges(calibration.observers, range_method)
    with _timed(timings, "plan"):
        plan = make_plan(prepared, chosen, ranges)
    with _timed(timings, "rewrite"):
        quantized = InsertQDQPass(plan=plan)(prepared).model
        DropIntermediateShapesPass()(quantized)
        quantized.producer_name = "qconvert"
        quantized_bytes = model_io.to_bytes(quantized)
    with _timed(timings, "verify"):
        smoke = source.first() if source is not None else synthetic_sample(specs)
        verify_model(quantized_bytes, smoke.feeds)
    with _timed(timings, "save"):
        model_io.write_atomically(output, quantized_bytes)

    comparison = None
    if evaluation is not None:
        with (
            _timed(timings, "evaluate"),
            progress.task("Evaluating", len(evaluation)) as advance,
        ):
            comparison = _evaluate(model, output, quantized_bytes, evaluation, advance)
    result = Report(
        command="quantize",
        model=str(model),
        output=str(output),
        conversion=Conversion.from_plan(
            plan,
            opsets=(opset_before, quantized.opset_imports.get("", 1)),
            sizes=(model_io.file_size(model), model_io.file_size(output)),
            samples=calibration.samples,
        ),
        comparison=comparison,
        seconds=timings,
    )
    if report is not None:
        result.write(report)
    return result


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
    """
    if workers < 1:
        raise ConfigError(f"--workers {workers} must be at least 1.")
    outputs = [Path(p) for p in (output, trt_cache) if p is not None]
    for path in outputs:
        model_io.check_output_path(path, force=force)
    float_model = model_io.load_model(model)
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
    settings = CollectSettings(batch_size=batch_size, tensors_per_pass=tensors_per_pass)
    data_spec = DataSpec(
        folder=str(data), specs=specs, images=images, samples=samples, seed=seed
    )
    calibrated = prepare(float_model.clone(), min_opset=1)
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
        candidate_model = model_io.load_model(candidate)
        if load_outputs is not None:
            saved = SavedOutputs(load_outputs)
            check_interfaces(saved, candidate_model, names=(str(load_outputs), str(candidate)))
            reference_side: Side | SavedOutputs = saved
            specs = input_specs(candidate_model)
        else:
            reference_model = model_io.load_model(reference)
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


def inspect(model: PathLike) -> ModelSummary:
    """Summarizes `model`: interface, opsets, ops, parameters and quantizable nodes."""
    return summarize(model_io.load_model(model))


def _evaluate(
    model: PathLike,
    output: Path,
    quantized_bytes: bytes,
    evaluation: DirectorySource,
    advance: Callable[[], None],
) -> Comparison:
    """Compares the float model with the quantized one just written."""
    labels_path = folder_labels(evaluation.folder)
    labels = load_labels(labels_path, len(evaluation)) if labels_path else None
    return compare_models(
        Side(model=str(model), path=str(model), bytes=model_io.file_size(model)),
        Side(model=quantized_bytes, path=str(output), bytes=model_io.file_size(output)),
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
