"""The command line's surface: help, version, inspect, python -m."""

from __future__ import annotations

import json
import subprocess
import sys

import qconvert


def test_version(run_cli):
    result = run_cli("--version")
    assert result.code == 0
    assert result.out.strip() == f"qconvert, version {qconvert.__version__}"


def test_python_dash_m_help():
    done = subprocess.run(
        [sys.executable, "-m", "qconvert", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0
    for verb in ("quantize", "inspect"):
        assert verb in done.stdout
    assert "Exit codes" in done.stdout


def test_unknown_option_is_a_usage_error(run_cli, tiny_cnn):
    result = run_cli("quantize", tiny_cnn, "--no-such-option")
    assert result.code == 2
    assert "No such option" in result.err


def test_unknown_scheme_is_a_usage_error(run_cli, tiny_cnn, tmp_path):
    result = run_cli("quantize", tiny_cnn, "--data", tmp_path / "calib", "--scheme", "int3")
    assert result.code == 2
    assert "int3" in result.err


def test_inspect_lists_interface_ops_and_quantizable_nodes(run_cli, tiny_cnn):
    result = run_cli("inspect", tiny_cnn, "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["inputs"] == [{"name": "input", "dtype": "float", "shape": ["N", 3, 8, 8]}]
    assert summary["outputs"][0]["name"] == "logits"
    assert summary["opsets"] == {"ai.onnx": 17}
    assert summary["op_histogram"]["Conv"] == 1 and summary["op_histogram"]["Relu"] == 1
    # conv_w 8*3*3*3 + conv_b 8 + 4 BN vectors of 8 + fc_w 10*128 + fc_b 10
    assert summary["parameters"] == 216 + 8 + 32 + 1280 + 10
    assert summary["parameter_bytes"] == 4 * summary["parameters"]
    assert len(summary["quantizable_nodes"]) == 2


def test_inspect_terminal_table(run_cli, tiny_cnn):
    result = run_cli("inspect", tiny_cnn)
    assert result.code == 0
    assert "int8 would quantize 2 nodes" in result.out
    assert "BatchNormalization" in result.out


def test_inspect_missing_model(run_cli, tmp_path):
    result = run_cli("inspect", tmp_path / "missing.onnx")
    assert result.code == 3
    assert (
        result.err.strip()
        == f"Error: Model file '{tmp_path / 'missing.onnx'}' does not exist."
    )
