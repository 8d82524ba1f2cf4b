"""Recurrent layers read int8-stored weights; an LSTM runs them on an integer kernel.

onnxruntime has no static integer LSTM, GRU or RNN kernel. The static schemes store their
W and R as int8, one scale per row, read through Mul(Cast(W_q), scale), which onnxruntime
folds into a float initializer when it loads the model: the file shrinks by three
quarters of those weights and a GRU or RNN runs in float on slightly rounded weights. An
LSTM then runs those same integers on com.microsoft DynamicQuantizeLSTM, which quantizes
X and H at every step (`passes/recurrent.py`).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper as nh

from qconvert import testing

SAMPLES = 16
STEPS = 24


def _sequences(count: int, seed: int, size: int = 16) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"input": rng.standard_normal((STEPS, 1, size)).astype(np.float32)}
        for _ in range(count)
    ]


def _quantize(run_cli, tmp_path, model: onnx.ModelProto, *args):
    path = testing.save(model, tmp_path / "model.onnx")
    testing.write_samples(tmp_path / "calib", _sequences(SAMPLES, seed=0))
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    result = run_cli(
        "quantize", path, "--data", tmp_path / "calib", "-o", out, "--report", report,
        "--recipe", "fast", "--strict-kernels", *args,
    )  # fmt: skip
    assert result.code == 0, result.err
    return path, out, json.loads(report.read_text())


def _initializers(path) -> dict[str, np.ndarray]:
    return {init.name: nh.to_array(init) for init in onnx.load(path).graph.initializer}


@pytest.mark.parametrize(("op", "directions"), [("GRU", 1), ("GRU", 2), ("RNN", 1)])
def test_recurrent_weights_are_stored_int8_and_run_float(op, directions, tmp_path, run_cli):
    model = testing.recurrent(op, directions=directions)
    path, out, report = _quantize(run_cli, tmp_path, model)
    stored = _initializers(out)
    floats = {init.name: nh.to_array(init) for init in model.graph.initializer}
    for name in ("w", "r"):
        assert name not in stored
        assert stored[f"{name}_q"].dtype == np.int8
        assert stored[f"{name}_q"].shape == floats[name].shape
    # W and R are most of the float file; int8 brings them to a quarter, plus one float
    # scale per row (measured: 31% to 34% of the float file, 38% for the small RNN).
    assert out.stat().st_size < 0.4 * path.stat().st_size
    node = report["conversion"]["nodes"][0]
    assert node["precision"] == "float"
    assert "stored as int8" in node["reason"]
    # onnxruntime folds Mul(Cast(W_q), scale) when it loads the model: the run is the
    # float layer alone.
    assert testing.optimized_ops(out, tmp_path) == {op: 1}
    # Measured: 40.6 to 44.4 dB over 24 steps on these layers (rows of 0.05 to 0.5).
    assert testing.output_sqnr(path, out, _sequences(8, seed=100)) > 36.0


@pytest.mark.parametrize("directions", [1, 2])
def test_an_lstm_runs_its_int8_weights_on_the_integer_kernel(directions, tmp_path, run_cli):
    model = testing.recurrent("LSTM", directions=directions)
    path, out, report = _quantize(run_cli, tmp_path, model)
    floats = {init.name: nh.to_array(init) for init in model.graph.initializer}
    stored = _initializers(out)
    assert not any(name in stored for name in ("w", "r"))
    assert testing.optimized_ops(out, tmp_path) == {"DynamicQuantizeLSTM": 1}
    for name in ("w", "r"):
        # DynamicQuantizeLSTM takes W and R transposed, (directions, K, 4 x hidden), with
        # one scale per row of each direction; the rows share a scale across directions.
        integers = stored[f"{name}_q_transposed"]
        scale = stored[f"{name}_q_row_scale"]
        weights = floats[name]
        rows = np.abs(weights).max(axis=(0, 2))
        assert integers.dtype == np.int8
        assert scale.shape == (directions, 128)
        np.testing.assert_allclose(scale, np.broadcast_to(rows / 127, scale.shape), rtol=1e-6)
        expected = np.rint(weights / scale[:, :, None]).transpose(0, 2, 1)
        np.testing.assert_array_equal(integers, expected)
    assert out.stat().st_size < 0.4 * path.stat().st_size
    assert "DynamicQuantizeLSTM" in report["conversion"]["nodes"][0]["reason"]
    # Measured: 39.5 dB (forward) and 38.4 dB (bidirectional) over 24 steps, against
    # 40.6 to 44.4 dB with the layer in float on the same rounded weights.
    assert testing.output_sqnr(path, out, _sequences(8, seed=100)) > 36.0


def test_a_16_bit_scheme_keeps_the_lstm_float(tmp_path, run_cli):
    """DynamicQuantizeLSTM's 8-bit X and H would undo the precision 16x8 asks for."""
    model = testing.recurrent("LSTM")
    _, out, _ = _quantize(run_cli, tmp_path, model, "--scheme", "16x8")
    assert testing.optimized_ops(out, tmp_path) == {"LSTM": 1}


def test_weights_are_rounded_per_row_to_nearest(tmp_path, run_cli):
    model = testing.recurrent("GRU")
    _, out, _ = _quantize(run_cli, tmp_path, model)
    floats = {init.name: nh.to_array(init) for init in model.graph.initializer}
    stored = _initializers(out)
    for name in ("w", "r"):
        weights = floats[name]
        integers, scale = stored[f"{name}_q"], stored[f"{name}_scale"]
        # One scale per row of each gate (3 x 32 rows): max |w| of the row over 127.
        rows = np.abs(weights).max(axis=2, keepdims=True)
        np.testing.assert_allclose(scale, rows / 127, rtol=1e-6)
        assert scale.shape == (1, 96, 1)
        # Rounded to nearest: within half a step of the float weight, the step its own.
        error = np.abs(integers * scale - weights)
        assert np.all(error <= scale / 2 * (1 + 1e-5))
        np.testing.assert_array_equal(integers, np.rint(weights / scale))


def test_an_excluded_recurrent_layer_keeps_its_weights_float(tmp_path, run_cli):
    model = testing.recurrent("LSTM")
    path, out, report = _quantize(run_cli, tmp_path, model, "--exclude", "node")
    stored = _initializers(out)
    floats = {init.name: nh.to_array(init) for init in model.graph.initializer}
    for name in ("w", "r"):
        np.testing.assert_array_equal(stored[name], floats[name])
    assert not any(a.dtype == np.int8 for a in stored.values())
    assert out.stat().st_size > 0.95 * path.stat().st_size
    assert "stored as int8" not in report["conversion"]["nodes"][0]["reason"]
    assert testing.output_sqnr(path, out, _sequences(4, seed=100)) > 100.0
