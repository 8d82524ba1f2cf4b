"""MLflow: one tracked run per command, so conversions can be compared in an experiment.

`--mlflow` on quantize, calibrate and compare logs, to the tracking server or store that
`MLFLOW_TRACKING_URI` names (MLflow's own default otherwise):

- parameters: the command, scheme, format and method, every option given on the command
  line (the ones that differ from the defaults), and SHA-256 fingerprints of the model(s),
  the data folder and the calibration file;
- metrics: the size ratio and sizes, every fidelity figure of every output (SQNR, cosine,
  errors, top-1 agreement, top-5 overlap), accuracies and their drop, latencies, the
  seconds of each stage (calibration among them), the process's peak memory, each gate's
  measured value and verdict;
- tags: the qconvert, onnxruntime and onnx versions, Python, the platform and the CPU;
- artifacts: the JSON and HTML reports (the calibration file for calibrate); the model
  only with `--mlflow-log-model`.

MLflow is an optional extra (`pip install 'qconvert[mlflow]'`); `require_mlflow` fails
with a usage error naming it before any work. Logging comes after the command's work and
files are written: a tracking server that cannot be reached costs one warning line, never
the conversion.

MLflow metrics are finite numbers: an infinite figure (the SQNR of an exact output) is
logged as the largest float, +/-1.8e308, and a NaN is left out.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import platform
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qconvert import __version__
from qconvert.errors import ConfigError

if TYPE_CHECKING:
    from qconvert.report import Report

logger = logging.getLogger(__name__)

EXTRA = "pip install 'qconvert[mlflow]'"
# Unless the user set them, one quick try: an unreachable server must not hold the
# command for MLflow's default of seven retries with exponential backoff.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
_METRIC_NAME = re.compile(r"[^A-Za-z0-9_\-. /]")
_PARAM_LIMIT = 6000  # MLflow's limit on a parameter value's length


@dataclass(frozen=True, slots=True, kw_only=True)
class MlflowSettings:
    """Where and how to log a run.

    Attributes:
        experiment: the experiment's name (None: MLflow's default or
            MLFLOW_EXPERIMENT_NAME).
        run_name: the run's name (None: MLflow picks one).
        log_model: also log the written (or compared) model file as an artifact.
    """

    experiment: str | None = None
    run_name: str | None = None
    log_model: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRecord:
    """Everything one run logs."""

    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: tuple[Path, ...] = ()


def require_mlflow() -> None:
    """Fails, as a usage error naming the extra, when MLflow is not installed.

    Raises:
        ConfigError: mlflow cannot be imported.
    """
    try:
        import mlflow  # noqa: F401 - only its presence is checked here
    except ImportError:
        raise ConfigError(
            "--mlflow needs MLflow, which is not installed.", hint=f"{EXTRA}."
        ) from None


def report_record(
    report: Report,
    *,
    params: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    fingerprints: Mapping[str, str | os.PathLike[str] | None] | None = None,
) -> RunRecord:
    """Parameters, metrics and tags of a quantize or compare report.

    Args:
        report: the command's report.
        params: further parameters, whatever their source (the range method).
        options: the options given on the command line, by name.
        fingerprints: files or folders to fingerprint, by parameter name (`model`,
            `data`, ...); None entries are left out.
    """
    params_given, params = params, {"command": report.command}
    conversion = report.conversion
    if conversion is not None:
        params.update(scheme=conversion.scheme, format=conversion.format)
        recipe = getattr(conversion, "recipe", None)  # a later field, logged when present
        if isinstance(recipe, str) and recipe:
            params["recipe"] = recipe
    params.update({name: str(value) for name, value in (params_given or {}).items()})
    params.update(option_params(options or {}))
    params.update(fingerprint_params(fingerprints or {}))
    metrics = report_metrics(report)
    return RunRecord(params=params, metrics=metrics, tags=environment_tags(report.command))


def report_metrics(report: Report) -> dict[str, float]:
    """Every figure of the report as MLflow metrics (see the module docstring)."""
    metrics: dict[str, float | None] = {}
    if report.size_ratio is not None:
        metrics["size_ratio"] = report.size_ratio
    conversion = report.conversion
    if conversion is not None:
        metrics.update(
            float_bytes=conversion.float_bytes,
            converted_bytes=conversion.converted_bytes,
            calibration_samples=conversion.calibration_samples,
            nodes=len(conversion.nodes),
            float_nodes=len(conversion.float_nodes),
        )
        clipped = [row.clipped for row in conversion.activations if row.clipped is not None]
        if clipped:
            metrics["max_clipped_share"] = max(clipped)
        spreads = [row.spread for row in conversion.weights if math.isfinite(row.spread)]
        if spreads:
            metrics["max_channel_spread"] = max(spreads)
    comparison = report.comparison
    if comparison is not None:
        metrics.update(
            samples=comparison.samples,
            reference_bytes=comparison.reference.bytes,
            candidate_bytes=comparison.candidate.bytes,
            reference_accuracy=comparison.reference_accuracy,
            candidate_accuracy=comparison.candidate_accuracy,
            accuracy_drop_points=comparison.accuracy_drop_points,
            latency_ratio=comparison.latency_ratio,
        )
        for side, run in (
            ("reference", comparison.reference),
            ("candidate", comparison.candidate),
        ):
            if run.latency is not None:
                metrics[f"latency.{side}.median_ms"] = run.latency.median_ms
                metrics[f"latency.{side}.p90_ms"] = run.latency.p90_ms
        for out in comparison.outputs:
            for figure in (
                "sqnr_db",
                "cosine",
                "max_abs_error",
                "mean_abs_error",
                "relative_error",
                "top1_agreement",
                "top5_overlap",
            ):
                metrics[f"output.{out.name}.{figure}"] = getattr(out, figure)
        if comparison.outputs:
            metrics["min_output_sqnr_db"] = min(
                (out.sqnr_db for out in comparison.outputs), key=_nan_low
            )
        if comparison.layers:
            metrics["min_layer_local_sqnr_db"] = min(
                (layer.local_sqnr_db for layer in comparison.layers), key=_nan_low
            )
    for stage, seconds in report.seconds.items():
        metrics[f"seconds.{stage}"] = seconds
    if "calibrate" in report.seconds:
        metrics["calibration_seconds"] = report.seconds["calibrate"]
    for gate in report.gates:
        metrics[f"gate.{gate.gate}.measured"] = gate.measured
        metrics[f"gate.{gate.gate}.passed"] = float(gate.passed)
    if report.gates:
        metrics["gates_passed"] = float(report.passed)
    memory = peak_memory_mb()
    if memory is not None:
        metrics["peak_memory_mb"] = memory
    return finite_metrics(metrics)


def finite_metrics(metrics: Mapping[str, float | int | None]) -> dict[str, float]:
    """Metric names MLflow accepts, values as finite floats; None and NaN left out."""
    result = {}
    for name, value in metrics.items():
        if value is None:
            continue
        value = float(value)
        if math.isnan(value):
            continue
        if math.isinf(value):
            value = sys.float_info.max if value > 0 else -sys.float_info.max
        result[_METRIC_NAME.sub("_", name)] = value
    return result


def option_params(options: Mapping[str, Any]) -> dict[str, str]:
    """Command-line options as parameters, `option.NAME` = the value as text."""
    params = {}
    for name, value in options.items():
        if isinstance(value, tuple | list):
            text = ",".join(str(item) for item in value)
        else:
            text = str(value)
        params[f"option.{name}"] = text[:_PARAM_LIMIT]
    return params


def fingerprint_params(
    paths: Mapping[str, str | os.PathLike[str] | None],
) -> dict[str, str]:
    """`NAME.sha256` for each file or folder given."""
    return {
        f"{name}.sha256": fingerprint(path) for name, path in paths.items() if path is not None
    }


def fingerprint(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, or of a folder: every file's relative path and bytes, sorted."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file is not path:
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def environment_tags(command: str) -> dict[str, str]:
    """Versions and machine, as tags."""
    import onnx
    import onnxruntime

    return {
        "qconvert.command": command,
        "qconvert.version": __version__,
        "onnxruntime.version": onnxruntime.__version__,
        "onnx.version": onnx.__version__,
        "python.version": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
    }


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` says."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def peak_memory_mb() -> float | None:
    """The peak resident memory of this process and its finished workers, in MiB."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peaks = [
        resource.getrusage(who).ru_maxrss
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    ]
    # Linux reports KiB, macOS bytes.
    unit = 1 if sys.platform == "darwin" else 1024
    return max(peaks) * unit / (1 << 20)


def report_artifacts(report: Report, folder: Path) -> tuple[Path, ...]:
    """Writes the JSON and HTML reports into `folder` and returns their paths."""
    paths = (folder / "report.json", folder / "report.html")
    for path in paths:
        report.write(path)
    return paths


def log_run(record: RunRecord, settings: MlflowSettings) -> str | None:
    """Logs one run; returns its id, or None (after one warning) when logging failed."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    try:
        with _quiet_mlflow():
            if settings.experiment is not None:
                mlflow.set_experiment(settings.experiment)
            with mlflow.start_run(run_name=settings.run_name) as run:
                mlflow.log_params(record.params)
                mlflow.log_metrics(record.metrics)
                mlflow.set_tags(record.tags)
                for artifact in record.artifacts:
                    mlflow.log_artifact(str(artifact))
                return run.info.run_id
    except Exception as exc:  # noqa: BLE001 - any failure of the tracker must not fail the run
        logger.warning("MLflow: the run was not logged to '%s': %s", uri, _first_line(exc))
        return None


def log_report(
    report: Report,
    settings: MlflowSettings,
    *,
    params: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    fingerprints: Mapping[str, str | os.PathLike[str] | None] | None = None,
    model: str | os.PathLike[str] | None = None,
) -> str | None:
    """Logs a quantize or compare report as one run (see the module docstring).

    Args:
        report: the command's report.
        settings: experiment, run name, whether to log the model.
        params: further parameters (the range method).
        options: the options given on the command line.
        fingerprints: files and folders to fingerprint, by parameter name.
        model: the model file to log with `settings.log_model`.

    Returns:
        The run's id, or None when the tracker could not be reached (one warning).
    """
    record = report_record(report, params=params, options=options, fingerprints=fingerprints)
    with tempfile.TemporaryDirectory(prefix="qconvert-mlflow-") as folder:
        artifacts = report_artifacts(report, Path(folder))
        if settings.log_model and model is not None:
            artifacts = (*artifacts, Path(model))
        record = RunRecord(
            params=record.params, metrics=record.metrics, tags=record.tags, artifacts=artifacts
        )
        return log_run(record, settings)


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """MLflow's info lines and warnings off, quick HTTP failures, for the call only."""
    saved = {name: os.environ.get(name) for name in _HTTP_DEFAULTS}
    for name, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    mlflow_logger = logging.getLogger("mlflow")
    level = mlflow_logger.level
    mlflow_logger.setLevel(logging.ERROR if not logger.isEnabledFor(logging.DEBUG) else level)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        mlflow_logger.setLevel(level)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _nan_low(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def log_calibration(
    calibration: Any,
    output: str | os.PathLike[str],
    settings: MlflowSettings,
    *,
    seconds: float,
    options: Mapping[str, Any] | None = None,
    fingerprints: Mapping[str, str | os.PathLike[str] | None] | None = None,
    artifacts: tuple[str | os.PathLike[str], ...] = (),
) -> str | None:
    """Logs a calibrate run: its options, samples, tensors, time, memory and the file.

    Args:
        calibration: the `Calibration` written.
        output: the calibration file, logged as an artifact.
        settings: experiment and run name.
        seconds: how long the calibration took.
        options: the options given on the command line.
        fingerprints: files and folders to fingerprint, by parameter name.
        artifacts: further files to log (a TensorRT cache).

    Returns:
        The run's id, or None when the tracker could not be reached (one warning).
    """
    metrics = finite_metrics(
        {
            "samples": calibration.samples,
            "tensors": len(calibration.observers),
            "calibration_seconds": seconds,
            "peak_memory_mb": peak_memory_mb(),
        }
    )
    record = RunRecord(
        params={
            "command": "calibrate",
            **option_params(options or {}),
            **fingerprint_params(fingerprints or {}),
        },
        metrics=metrics,
        tags=environment_tags("calibrate"),
        artifacts=(Path(output), *(Path(path) for path in artifacts)),
    )
    return log_run(record, settings)
