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
from qconvert.calibration import calibrate_tensors, tensors_to_calibrate
from qconvert.compare import (
    CompareOptions,
    Comparison,
    Side,
    check_interfaces,
    compare_models,
    folder_labels,
    load_labels,
)
from qconvert.dataset import DirectorySource, Sample, input_specs
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


def quantize(
    model: PathLike,
    output: PathLike,
    *,
    data: PathLike,
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
        data: a folder of calibration samples.
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
    output = model_io.check_output_path(output, force=force)
    if report is not None:
        check_report_path(report)
    timings: dict[str, float] = {}

    with _timed(timings, "load"):
        float_model = model_io.load_model(model)
        opset_before = float_model.opset_imports.get("", 1)
        source = DirectorySource(data, input_specs(float_model))
        evaluation = (
            DirectorySource(eval_data, source.specs) if eval_data is not None else None
        )
    with _timed(timings, "prepare"):
        prepared = prepare(float_model, min_opset=chosen.min_opset)
    with _timed(timings, "calibrate"), progress.task("Calibrating", len(source)) as advance:
        ranges = calibrate_tensors(
            prepared, source, tensors_to_calibrate(prepared), on_sample=advance
        )
    with _timed(timings, "plan"):
        plan = make_plan(prepared, chosen, ranges)
    with _timed(timings, "rewrite"):
        quantized = InsertQDQPass(plan=plan)(prepared).model
        DropIntermediateShapesPass()(quantized)
        quantized.producer_name = "qconvert"
        quantized_bytes = model_io.to_bytes(quantized)
    with _timed(timings, "verify"):
        verify_model(quantized_bytes, source.first().feeds)
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
            samples=len(source),
        ),
        comparison=comparison,
        seconds=timings,
    )
    if report is not None:
        result.write(report)
    return result


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


__all__ = ["compare", "inspect", "quantize"]
