"""Degenerate models: quantize either writes a sound model or says why not, never crashes."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

import qconvert
from qconvert import testing
from qconvert.runtime import make_session


def _model(nodes, inputs, outputs, initializers=()):
    graph = h.make_graph(
        nodes,
        "degenerate",
        [h.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs],
        [h.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs],
        [nh.from_array(array, name) for name, array in initializers],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _quantize(model, tmp_path, feeds_list):
    path = testing.save(model, tmp_path / "model.onnx")
    calib = testing.write_samples(tmp_path / "calib", feeds_list)
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(path, out, data=calib)
    return path, out, report


def _outputs(path, feeds):
    return make_session(str(path)).run(None, feeds)


def _weights(seed=0):
    return np.random.default_rng(seed).standard_normal((4, 4)).astype(np.float32)


def test_model_with_no_quantizable_op_is_written_unchanged_in_meaning(tmp_path, run_cli):
    model = _model(
        [
            h.make_node("Relu", ["x"], ["y"], name="r"),
            h.make_node("Erf", ["y"], ["z"], name="s"),
        ],
        [("x", [1, 4])],
        [("z", [1, 4])],
    )
    feeds = testing.random_inputs(model)
    path, out, report = _quantize(model, tmp_path, [feeds])
    assert report.conversion.quantized_ops == {}
    assert {n.reason for n in report.conversion.float_nodes} == {
        "not in the op table: stays float"
    }
    np.testing.assert_array_equal(_outputs(path, feeds)[0], _outputs(out, feeds)[0])
    cli = run_cli("quantize", path, "--data", tmp_path / "calib", "-o", tmp_path / "q2.onnx")
    assert cli.code == 0
    assert "none" in cli.out


def test_constant_only_arithmetic_stays_float(tmp_path):
    ones = np.ones((4, 4), np.float32)
    model = _model(
        [
            h.make_node("MatMul", ["c", "w"], ["y"], name="const_mm"),
            h.make_node("Add", ["y", "x"], ["z"], name="add"),
        ],
        [("x", [4, 4])],
        [("z", [4, 4])],
        [("w", ones), ("c", ones)],
    )
    feeds = testing.random_inputs(model)
    path, out, report = _quantize(model, tmp_path, [feeds])
    reasons = {n.name: n.reason for n in report.conversion.float_nodes}
    assert reasons["const_mm"] == "input 0 is a constant: stays float"
    np.testing.assert_allclose(_outputs(path, feeds)[0], _outputs(out, feeds)[0], rtol=1e-6)


def test_activations_all_zero_get_a_usable_scale(tmp_path):
    # Relu of x @ (-1) on positive inputs: the middle tensor is zero on every sample.
    minus = -np.ones((4, 4), np.float32)
    model = _model(
        [
            h.make_node("MatMul", ["x", "w"], ["y"], name="mm1"),
            h.make_node("Relu", ["y"], ["r"], name="relu"),
            h.make_node("MatMul", ["r", "w"], ["z"], name="mm2"),
        ],
        [("x", [1, 4])],
        [("z", [1, 4])],
        [("w", minus)],
    )
    feeds = [{"x": np.abs(testing.random_inputs(model, seed=i)["x"])} for i in range(4)]
    _path, out, _report = _quantize(model, tmp_path, feeds)
    graph = onnx.load_model(str(out)).graph
    scales = [nh.to_array(t) for t in graph.initializer if t.name.endswith("_scale")]
    assert all(np.isfinite(s).all() and (s > 0).all() for s in scales)
    np.testing.assert_array_equal(_outputs(out, feeds[0])[0], np.zeros((1, 4), np.float32))


def test_duplicate_and_empty_node_names(tmp_path):
    model = _model(
        [
            h.make_node("MatMul", ["x", "w"], ["y"], name="same"),
            h.make_node("Relu", ["y"], ["r"], name="same"),
            h.make_node("MatMul", ["r", "w2"], ["z"]),
        ],
        [("x", [1, 4])],
        [("z", [1, 4])],
        [("w", _weights(0)), ("w2", _weights(1))],
    )
    feeds = [testing.random_inputs(model, seed=i) for i in range(16)]
    _path, out, report = _quantize(model, tmp_path, feeds)
    assert report.conversion.quantized_ops["MatMul"] == 2
    names = [n.name for n in onnx.load_model(str(out)).graph.node]
    assert len(names) == len(set(names)) and all(names)
    # onnxruntime itself refuses the duplicate names, so the reference gets them fixed.
    for index, node in enumerate(model.graph.node):
        node.name = f"n{index}"
    reference = testing.save(model, tmp_path / "renamed.onnx")
    assert testing.output_sqnr(reference, out, feeds) > 25


def test_unused_input_and_zero_sized_batch(tmp_path):
    model = _model(
        [h.make_node("MatMul", ["x", "w"], ["z"], name="mm")],
        [("x", ["N", 4]), ("unused", [1, 4])],
        [("z", ["N", 4])],
        [("w", _weights())],
    )
    feeds = [
        {"x": np.zeros((0, 4), np.float32), "unused": np.ones((1, 4), np.float32)},
        {"x": np.ones((2, 4), np.float32), "unused": np.ones((1, 4), np.float32)},
    ]
    path, out, _ = _quantize(model, tmp_path, feeds)
    assert _outputs(out, feeds[0])[0].shape == (0, 4)
    np.testing.assert_allclose(
        _outputs(out, feeds[1])[0], _outputs(path, feeds[1])[0], atol=0.05
    )


def _nan_on_zeros_model():
    """MatMul, then Log: finite on positive inputs, -inf where the input is all zeros."""
    weights = np.abs(_weights()) + 0.1
    return _model(
        [
            h.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
            h.make_node("Log", ["y"], ["z"], name="log"),
        ],
        [("x", [1, 4])],
        [("z", [1, 4])],
        [("w", weights)],
    )


def test_data_free_scheme_is_not_failed_by_a_zeros_smoke_sample(tmp_path):
    # Without data the smoke run uses zeros; the float model itself gives -inf there, so that
    # run says nothing about the conversion and must not fail it.
    model = _nan_on_zeros_model()
    path = testing.save(model, tmp_path / "model.onnx")
    out = tmp_path / "q.onnx"
    config = qconvert.QuantizeConfig(scheme="fp16-weights")
    qconvert.quantize(path, out, config=config)
    feeds = {"x": np.ones((1, 4), np.float32)}
    np.testing.assert_allclose(_outputs(out, feeds)[0], _outputs(path, feeds)[0], rtol=1e-3)


def test_data_free_scheme_smoke_runs_on_the_given_data(tmp_path, monkeypatch):
    from qconvert.pipelines import verify_save as pipeline

    model = _nan_on_zeros_model()
    path = testing.save(model, tmp_path / "model.onnx")
    data = testing.write_samples(tmp_path / "data", [{"x": np.full((1, 4), 2.0, np.float32)}])
    seen = []
    real_verify = pipeline.verify_model
    monkeypatch.setattr(
        pipeline,
        "verify_model",
        lambda m, feeds, **kw: (seen.append(feeds), real_verify(m, feeds, **kw))[1],
    )
    qconvert.quantize(
        path, tmp_path / "q.onnx", data=data, config=qconvert.QuantizeConfig(scheme="fp16")
    )
    np.testing.assert_array_equal(seen[0]["x"], np.full((1, 4), 2.0, np.float32))
