"""`compare`: two models (or saved outputs and a model) on the same samples, gated."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from qconvert import model as model_io
from qconvert.compare import (
    CompareOptions,
    Side,
    check_interfaces,
    compare_models,
    folder_labels,
    load_labels,
)
from qconvert.dataset import (
    DirectorySource,
    Sample,
    input_specs,
)
from qconvert.errors import (
    CalibrationDataError,
    ConfigError,
    OutputError,
)
from qconvert.gates import NO_GATES, Gates, check_gates
from qconvert.latency import LatencyConfig
from qconvert.limits import DEFAULT_LIMITS, LoadLimits
from qconvert.pipelines.stages import PathLike, timed
from qconvert.progress import SILENT, Progress
from qconvert.report import Report, check_report_path
from qconvert.runtime import resolve_provider
from qconvert.saved_outputs import SavedOutputs


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

    with timed(timings, "load"):
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
    with timed(timings, "compare"), progress.task("Comparing", len(source)) as advance:
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
