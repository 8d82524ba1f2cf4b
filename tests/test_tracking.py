"""`--mlflow` against a real MLflow tracking store (SQLite, in a temporary folder), read back
with MlflowClient; the unreachable server; the usage error without the extra.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import mlflow
import onnx
import onnxruntime
import pytest
from conftest import sha256

import qconvert
from qconvert import testing

EXPERIMENT = "qconvert-tests"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, Path]:
    """One SQLite store for the module (creating its schema takes seconds), and the
    experiment's artifact folder."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    artifacts = folder / "artifacts"
    mlflow.MlflowClient(uri).create_experiment(
        EXPERIMENT, artifact_location=artifacts.as_uri()
    )
    return uri, artifacts


@pytest.fixture
def tracked(store, monkeypatch, tmp_path) -> mlflow.MlflowClient:
    uri, _ = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow's defaults write beside the working folder
    return mlflow.MlflowClient(uri)


@pytest.fixture
def model(tmp_path) -> Path:
    model = testing.conv_bn_relu()
    path = testing.save(model, tmp_path / "model.onnx")
    testing.write_samples(
        tmp_path / "calib", [testing.random_inputs(model, seed=i) for i in range(8)]
    )
    return path


def _run(client: mlflow.MlflowClient, name: str):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'"
    )
    assert len(runs) == 1, [run.info.run_name for run in runs]
    return runs[0]


def _artifact(client: mlflow.MlflowClient, run, name: str, folder: Path) -> Path:
    return Path(client.download_artifacts(run.info.run_id, name, str(folder)))


def test_quantize_logs_params_metrics_tags_and_artifacts(tracked, run_cli, model, tmp_path):
    out = tmp_path / "model.int8.onnx"
    result = run_cli(
        "quantize", model, "--data", tmp_path / "calib", "--eval", tmp_path / "calib",
        "--method", "minmax", "-o", out, "--json",
        "--mlflow", "--mlflow-experiment", EXPERIMENT, "--mlflow-run-name", "q1",
        "--mlflow-log-model",
    )  # fmt: skip
    assert result.code == 0, result.err
    assert result.err == ""
    report = json.loads(result.out)
    run = _run(tracked, "q1")
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["command"] == "quantize"
    assert (params["scheme"], params["format"], params["method"]) == ("int8", "qdq", "minmax")
    assert params["model.sha256"] == sha256(model)
    assert len(params["data.sha256"]) == 64 and params["eval.sha256"] == params["data.sha256"]
    # The options given on the command line, and none left at its default.
    assert params["option.method"] == "minmax"
    assert params["option.eval_data"] == str(tmp_path / "calib")
    assert "option.per_channel" not in params and "option.scheme" not in params
    metrics = run.data.metrics
    conversion, comparison = report["conversion"], report["comparison"]
    assert metrics["size_ratio"] == pytest.approx(conversion["size_ratio"])
    assert metrics["float_bytes"] == conversion["float_bytes"]
    assert metrics["nodes"] == len(conversion["nodes"])
    output = comparison["outputs"][0]
    for figure in ("sqnr_db", "cosine", "max_abs_error", "relative_error", "top1_agreement"):
        assert metrics[f"output.logits.{figure}"] == pytest.approx(output[figure]), figure
    assert metrics["calibration_seconds"] == pytest.approx(report["seconds"]["calibrate"])
    assert metrics["seconds.verify"] == pytest.approx(report["seconds"]["verify"])
    assert metrics["peak_memory_mb"] > 10
    tags = run.data.tags
    assert tags["qconvert.version"] == qconvert.__version__
    assert tags["onnxruntime.version"] == onnxruntime.__version__
    assert tags["onnx.version"] == onnx.__version__
    assert tags["cpu"]
    names = {item.path for item in tracked.list_artifacts(run.info.run_id)}
    assert names == {"report.json", "report.html", "model.int8.onnx"}
    logged = json.loads(_artifact(tracked, run, "report.json", tmp_path / "dl").read_text())
    assert logged == report
    assert sha256(_artifact(tracked, run, "model.int8.onnx", tmp_path / "dl")) == sha256(out)
    html = _artifact(tracked, run, "report.html", tmp_path / "dl").read_text()
    assert '<section id="nodes">' in html


def test_compare_logs_gate_results(tracked, run_cli, model, tmp_path):
    candidate = tmp_path / "q.onnx"
    qconvert.quantize(model, candidate, data=tmp_path / "calib")
    result = run_cli(
        "compare", model, candidate, "--data", tmp_path / "calib",
        "--min-sqnr", "1000", "--max-size-ratio", "1", "--json",
        "--mlflow", "--mlflow-experiment", EXPERIMENT, "--mlflow-run-name", "c1",
    )  # fmt: skip
    assert result.code == 1
    report = json.loads(result.out)
    run = _run(tracked, "c1")
    metrics = run.data.metrics
    measured = {gate["gate"]: gate["measured"] for gate in report["gates"]}
    assert metrics["gate.min-sqnr.passed"] == 0.0
    assert metrics["gate.max-size-ratio.passed"] == 1.0
    assert metrics["gate.min-sqnr.measured"] == pytest.approx(measured["min-sqnr"])
    assert metrics["gates_passed"] == 0.0
    assert metrics["size_ratio"] == pytest.approx(report["comparison"]["size_ratio"])
    assert run.data.params["candidate.sha256"] == sha256(candidate)
    assert run.data.params["option.min_sqnr"] == "1000.0"
    names = {item.path for item in tracked.list_artifacts(run.info.run_id)}
    assert names == {"report.json", "report.html"}  # no model without --mlflow-log-model


def test_calibrate_logs_samples_time_memory_and_the_file(tracked, run_cli, model, tmp_path):
    out = tmp_path / "model.calib.json"
    result = run_cli(
        "calibrate", model, "--data", tmp_path / "calib", "-o", out, "--workers", "1",
        "--mlflow", "--mlflow-experiment", EXPERIMENT, "--mlflow-run-name", "k1",
    )  # fmt: skip
    assert result.code == 0, result.err
    run = _run(tracked, "k1")
    calibration = json.loads(out.read_text())
    assert run.data.params["command"] == "calibrate"
    assert run.data.params["model.sha256"] == sha256(model)
    assert run.data.metrics["samples"] == calibration["samples"] == 8
    assert run.data.metrics["tensors"] == len(calibration["tensors"])
    assert run.data.metrics["calibration_seconds"] > 0
    assert run.data.metrics["peak_memory_mb"] > 10
    names = {item.path for item in tracked.list_artifacts(run.info.run_id)}
    assert names == {"model.calib.json"}


def test_an_unreachable_server_is_one_warning_and_the_model_is_written(
    run_cli, model, tmp_path, monkeypatch
):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "model.int8.onnx"
    started = time.perf_counter()
    result = run_cli("quantize", model, "--data", tmp_path / "calib", "-o", out, "--mlflow")
    seconds = time.perf_counter() - started
    assert result.code == 0, result.err
    assert out.exists()
    warnings = result.err.strip().splitlines()
    assert len(warnings) == 1, result.err
    assert warnings[0].startswith(
        f"Warning: MLflow: the run was not logged to 'http://127.0.0.1:{port}': "
    )
    assert seconds < 60, seconds  # no retries with backoff


def test_without_mlflow_installed_the_flag_is_a_usage_error(
    run_cli, model, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now fails
    out = tmp_path / "model.int8.onnx"
    for args in (
        ("quantize", model, "--data", tmp_path / "calib", "-o", out),
        ("calibrate", model, "--data", tmp_path / "calib", "-o", tmp_path / "c.json"),
        ("compare", model, model, "--data", tmp_path / "calib"),
    ):
        result = run_cli(*args, "--mlflow")
        assert result.code == 2, result.err
        assert result.err == (
            "Error: --mlflow needs MLflow, which is not installed. "
            "Hint: pip install 'qconvert[mlflow]'.\n"
        )
    assert not out.exists() and not (tmp_path / "c.json").exists()


def test_mlflow_options_need_the_flag(run_cli, model, tmp_path):
    result = run_cli("quantize", model, "--data", tmp_path / "calib", "--mlflow-run-name", "x")
    assert result.code == 2
    assert "--mlflow-run-name needs --mlflow." in result.err
