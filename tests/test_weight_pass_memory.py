"""What the weight passes hold while their float runs build a session (`weight_passes`).

The float model is handed to onnxruntime as its graph's bytes beside the model's own
weight arrays, never a copy of them; each run of weight rounding's layers is freed before
the next run's session is built on top of it, and bias correction's float pass before the
corrections are computed.
"""

from __future__ import annotations

import numpy as np

import qconvert
from qconvert import model as model_io
from qconvert import testing
from qconvert.config import QuantizeConfig
from qconvert.passes import adaround, prepare
from qconvert.pipelines import weight_passes


def test_a_float_run_hands_onnxruntime_the_models_own_weights(tmp_path):
    path = testing.save(testing.matmul_add(k=256, n=128), tmp_path / "model.onnx")
    prepared = prepare(model_io.load_model(path), min_opset=1)
    detached = weight_passes._detached(prepared)

    own = prepared.graph.initializers["w"].const_value.numpy()
    assert sorted(detached.weights) == ["w"]
    assert np.shares_memory(detached.weights["w"], own)
    assert not any(t.raw_data for t in detached.proto.graph.initializer if t.name == "w")


def test_each_run_of_weight_rounding_is_freed_before_the_next_session(tmp_path, monkeypatch):
    model = testing.conv_bn_relu(channels=8)
    path = testing.save(model, tmp_path / "model.onnx")
    calib = testing.write_samples(
        tmp_path / "calib",
        [testing.random_inputs(model, batch=1, seed=seed) for seed in range(8)],
    )
    events = []
    make_session = weight_passes.make_session
    monkeypatch.setattr(adaround, "GRAM_BYTES", 1)  # one layer a run: the Conv, the Gemm
    monkeypatch.setattr(
        weight_passes,
        "make_session",
        lambda *args, **kwargs: events.append("session") or make_session(*args, **kwargs),
    )
    monkeypatch.setattr(weight_passes, "release_dropped", lambda: events.append("release"))

    qconvert.quantize(
        path, tmp_path / "out.onnx", data=calib, config=QuantizeConfig(adaround=True)
    )

    assert events == ["session", "release", "session", "release"]


def test_bias_corrections_float_pass_is_freed_before_the_corrections(tmp_path, monkeypatch):
    model = testing.conv_bn_relu(channels=8)
    path = testing.save(model, tmp_path / "model.onnx")
    calib = testing.write_samples(
        tmp_path / "calib",
        [testing.random_inputs(model, batch=1, seed=seed) for seed in range(8)],
    )
    events = []
    make_session = weight_passes.make_session
    correct = weight_passes.correct_biases
    monkeypatch.setattr(
        weight_passes,
        "make_session",
        lambda *args, **kwargs: events.append("session") or make_session(*args, **kwargs),
    )
    monkeypatch.setattr(weight_passes, "release_dropped", lambda: events.append("release"))
    monkeypatch.setattr(
        weight_passes,
        "correct_biases",
        lambda *args, **kwargs: events.append("correct") or correct(*args, **kwargs),
    )

    qconvert.quantize(
        path, tmp_path / "out.onnx", data=calib, config=QuantizeConfig(bias_correction=True)
    )

    assert events == ["session", "release", "correct"]
