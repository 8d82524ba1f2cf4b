"""`qconvert compare`: say in numbers what a conversion cost, and gate CI on it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from qconvert.cli import _console
from qconvert.cli._options import given_options, limit_options, mlflow_options
from qconvert.limits import LoadLimits

if TYPE_CHECKING:
    from qconvert.report import Report
    from qconvert.tracking import MlflowSettings


def _gate_option(name: str, help_text: str):
    return click.option(name, type=float, default=None, metavar="X", help=help_text)


@click.command("compare", short_help="Compare a converted model with its reference.")
@click.argument(
    "models", nargs=-1, type=click.Path(path_type=Path), metavar="[REFERENCE] CANDIDATE"
)
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder of samples both models accept (labels.npy inside gives accuracy).",
)
@click.option(
    "--labels",
    type=click.Path(path_type=Path),
    default=None,
    help="A .npy of one integer label per sample. [default: DATA/labels.npy if present]",
)
@_gate_option("--max-top1-drop", "Fail if accuracy drops by more than X points.")
@_gate_option("--min-top1-agreement", "Fail if top-1 agreement is below X percent.")
@_gate_option("--min-sqnr", "Fail if any output's SQNR is below X dB.")
@_gate_option("--min-cosine", "Fail if any output's cosine similarity is below X.")
@_gate_option("--max-size-ratio", "Fail if candidate size / reference size exceeds X.")
@_gate_option(
    "--max-latency-ratio",
    "Fail if candidate / reference median latency exceeds X (measures latency).",
)
@click.option(
    "--gates",
    "gates_file",
    type=click.Path(path_type=Path),
    default=None,
    help="TOML file with a [gates] table (same names as the options, which override it).",
)
@click.option(
    "--check-finite", is_flag=True, help="Fail on any NaN or Inf in either model's outputs."
)
@click.option(
    "--provider",
    "providers",
    multiple=True,
    metavar="NAME",
    help="onnxruntime execution provider (cpu, cuda, tensorrt or a full name); once for "
    "both models, or twice: reference then candidate. [default: cpu]",
)
@click.option("--latency", is_flag=True, help="Measure median and p90 latency of each model.")
@click.option(
    "--threads", type=int, default=1, show_default=True, help="Intra-op threads for --latency."
)
@click.option(
    "--runs",
    type=int,
    default=50,
    show_default=True,
    help="Timed runs per model for --latency.",
)
@click.option(
    "--per-layer", is_flag=True, help="Also compare intermediate tensors, worst first."
)
@click.option(
    "--save-outputs",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the reference outputs to this file, for --load-outputs later.",
)
@click.option(
    "--load-outputs",
    type=click.Path(path_type=Path),
    default=None,
    help="Use reference outputs saved with --save-outputs; then give only CANDIDATE.",
)
@click.option(
    "--report",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the report to this file (.json, .md or .html).",
)
@click.option(
    "--junit",
    type=click.Path(path_type=Path),
    default=None,
    metavar="FILE",
    help="Also write the gates as JUnit XML, one test case per gate (GitLab, Jenkins).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report to stdout only.")
@limit_options
@mlflow_options
def compare_command(
    models: tuple[Path, ...],
    data: Path,
    labels: Path | None,
    max_top1_drop: float | None,
    min_top1_agreement: float | None,
    min_sqnr: float | None,
    min_cosine: float | None,
    max_size_ratio: float | None,
    max_latency_ratio: float | None,
    gates_file: Path | None,
    check_finite: bool,
    providers: tuple[str, ...],
    latency: bool,
    threads: int,
    runs: int,
    per_layer: bool,
    save_outputs: Path | None,
    load_outputs: Path | None,
    report: Path | None,
    junit: Path | None,
    as_json: bool,
    limits: LoadLimits,
    mlflow: MlflowSettings | None,
) -> None:
    """Run REFERENCE and CANDIDATE on the samples in --data and report the difference.

    Per output: SQNR, cosine similarity, absolute and relative error, top-1 agreement and
    top-5 overlap; accuracy (with labels), sizes and, with --latency, median and p90
    latency.

    \b
      qconvert compare model.onnx model.int8.onnx --data eval/ --max-top1-drop 1
      qconvert compare model.onnx model.int8.onnx --data eval/ --per-layer --report r.html

    Exit code 1 when a gate fails (or --check-finite finds NaN/Inf); the report is still
    printed and written.

    In a GitHub Actions step (GITHUB_STEP_SUMMARY set), the Markdown report is appended
    to the job summary and each failed gate is annotated as an error.
    """
    from qconvert import (
        api,  # deferred: onnxruntime is slow to import and --help is not
        ci,
    )
    from qconvert.cli._publish import publish  # deferred: it imports every stage
    from qconvert.gates import Gates, load_gates
    from qconvert.latency import LatencyConfig

    expected = 1 if load_outputs is not None else 2
    if len(models) != expected:
        shape = "CANDIDATE" if load_outputs is not None else "REFERENCE CANDIDATE"
        raise click.UsageError(f"expected {shape}, got {len(models)} model path(s).")
    if len(providers) > 2:
        raise click.UsageError("--provider may be given once (both models) or twice.")
    chosen = providers or ("cpu",)
    gates = Gates(
        max_top1_drop=max_top1_drop,
        min_top1_agreement=min_top1_agreement,
        min_sqnr=min_sqnr,
        min_cosine=min_cosine,
        max_size_ratio=max_size_ratio,
        max_latency_ratio=max_latency_ratio,
    )
    if gates_file is not None:
        gates = load_gates(gates_file).overridden_by(gates)
    if junit is not None:
        ci.check_junit_path(junit)
    progress = _console.BarProgress() if _console.interactive() and not as_json else None
    result = api.compare(
        models[0] if load_outputs is None else None,
        models[-1],
        data=data,
        labels=labels,
        gates=gates,
        check_finite=check_finite,
        providers=(chosen[0], chosen[-1]),
        latency=(
            LatencyConfig(runs=runs, threads=threads)
            if latency or gates.needs_latency
            else None
        ),
        per_layer=per_layer,
        save_outputs=save_outputs,
        load_outputs=load_outputs,
        report=report,
        limits=limits,
        **({"progress": progress} if progress else {}),
    )

    def track(report: Report) -> None:
        from qconvert.tracking import log_report

        log_report(
            report,
            mlflow,
            options=given_options(click.get_current_context()),
            fingerprints={
                "reference": models[0] if load_outputs is None else None,
                "candidate": models[-1],
                "data": data,
                "labels": labels,
            },
            model=models[-1],
        )

    publish(result, as_json=as_json, junit=junit, track=track if mlflow is not None else None)
