"""The Python API: one function per verb, each returning a `Report`.

The command line is a thin layer over these functions. Each runs its pipeline as a visible
list of stages: load -> prepare -> calibrate -> plan -> rewrite -> verify -> save -> evaluate.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from qconvert import model as model_io
from qconvert.calibration import calibrate_tensors, tensors_to_calibrate
from qconvert.compare import compare_models, load_labels
from qconvert.dataset import DirectorySource, input_specs
from qconvert.errors import ConfigError
from qconvert.inspection import ModelSummary, summarize
from qconvert.passes import DropIntermediateShapesPass, InsertQDQPass, prepare
from qconvert.plan import make_plan
from qconvert.progress import SILENT, Progress
from qconvert.report import Conversion, Report, check_report_path
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
        report: a file to write the report to (`.json`).
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
        labels = load_labels(evaluation.folder, len(evaluation))
        with (
            _timed(timings, "evaluate"),
            progress.task("Evaluating", len(evaluation)) as advance,
        ):
            comparison = compare_models(
                str(model), quantized_bytes, evaluation, labels=labels, on_sample=advance
            )
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


def inspect(model: PathLike) -> ModelSummary:
    """Summarizes `model`: interface, opsets, ops, parameters and quantizable nodes."""
    return summarize(model_io.load_model(model))


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - start, 4)


__all__ = ["inspect", "quantize"]
