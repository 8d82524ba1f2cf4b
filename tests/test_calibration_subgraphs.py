"""Tensors inside If/Loop bodies reach calibration (qconvert.calibration.subgraphs)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qconvert
from qconvert import testing
from qconvert.calibration.subgraphs import expose_body_tensors

RNG = np.random.default_rng(0)
W = (RNG.standard_normal((8, 8)) * 0.3).astype(np.float32)


def _if_model() -> onnx.ModelProto:
    """If(cond): then y = x @ w, else y = x @ -w; both branches' results are wanted."""

    def branch(name, weight):
        return h.make_graph(
            [h.make_node("MatMul", ["input", weight], [f"{name}_y"], name=f"{name}_mm")],
            name,
            [],
            [h.make_tensor_value_info(f"{name}_y", T.FLOAT, ["N", 8])],
        )

    graph = h.make_graph(
        [
            h.make_node(
                "If",
                ["cond"],
                ["output"],
                name="if",
                then_branch=branch("then", "w"),
                else_branch=branch("else", "w_neg"),
            )
        ],
        "if_model",
        [
            h.make_tensor_value_info("input", T.FLOAT, ["N", 8]),
            h.make_tensor_value_info("cond", T.BOOL, [1]),
        ],
        [h.make_tensor_value_info("output", T.FLOAT, ["N", 8])],
        [nh.from_array(W, "w"), nh.from_array(-W, "w_neg")],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run_exposed(model: onnx.ModelProto, names, feeds) -> dict[str, np.ndarray]:
    expose_body_tensors(model, names)
    for name in names:
        model.graph.output.append(h.make_tensor_value_info(name, T.FLOAT, None))
    session = ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    outputs = session.run(None, feeds)
    return {
        meta.name: array for meta, array in zip(session.get_outputs(), outputs, strict=True)
    }


def test_a_loop_body_tensor_comes_out_stacked_over_the_iterations():
    x = RNG.standard_normal((2, 8)).astype(np.float32)
    model = testing.loop_matmul_relu(3)
    weights = next(nh.to_array(t) for t in model.graph.initializer if t.name == "w")
    seen = _run_exposed(model, ["y"], {"input": x})
    expected, current = [], x
    for _ in range(3):
        y = current @ weights
        expected.append(y)
        current = np.maximum(y, 0)
    np.testing.assert_allclose(seen["y"], np.stack(expected), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(seen["output"], current, rtol=1e-5, atol=1e-6)


def test_an_if_branch_tensor_comes_out_and_the_branch_not_taken_adds_nothing():
    x = RNG.standard_normal((2, 8)).astype(np.float32)
    for cond, taken, other, weight in (
        (True, "then_y", "else_y", W),
        (False, "else_y", "then_y", -W),
    ):
        seen = _run_exposed(
            _if_model(), ["then_y", "else_y"], {"input": x, "cond": np.array([cond])}
        )
        np.testing.assert_allclose(seen[taken], x @ weight, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(seen["output"], x @ weight, rtol=1e-5, atol=1e-6)
        assert seen[other].size == 0


def _growing_loop_model() -> onnx.ModelProto:
    """A Loop whose body slices its input to i + 1 columns in iteration i: a body tensor
    whose shape changes from one iteration to the next."""
    body = h.make_graph(
        [
            h.make_node("Add", ["i", "one"], ["end"], name="body_end"),
            h.make_node("Unsqueeze", ["end", "zero"], ["ends"], name="body_ends"),
            h.make_node("Slice", ["x_in", "zero", "ends", "one_axis"], ["part"], name="slice"),
            h.make_node("ReduceSum", ["part", "one_axis"], ["total"], name="sum"),
            h.make_node("MatMul", ["x_in", "w"], ["y"], name="body_mm"),
            h.make_node("Add", ["y", "total"], ["x_out"], name="body_add"),
            h.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
        ],
        "body",
        [
            h.make_tensor_value_info("i", T.INT64, []),
            h.make_tensor_value_info("cond_in", T.BOOL, []),
            h.make_tensor_value_info("x_in", T.FLOAT, ["N", 8]),
        ],
        [
            h.make_tensor_value_info("cond_out", T.BOOL, []),
            h.make_tensor_value_info("x_out", T.FLOAT, ["N", 8]),
        ],
    )
    graph = h.make_graph(
        [h.make_node("Loop", ["trips", "", "input"], ["output"], body=body, name="loop")],
        "growing_loop",
        [h.make_tensor_value_info("input", T.FLOAT, ["N", 8])],
        [h.make_tensor_value_info("output", T.FLOAT, ["N", 8])],
        [
            nh.from_array(W, "w"),
            nh.from_array(np.array(3, np.int64), "trips"),
            nh.from_array(np.array(1, np.int64), "one"),
            nh.from_array(np.array([0], np.int64), "zero"),
            nh.from_array(np.array([1], np.int64), "one_axis"),
        ],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_body_tensor_that_cannot_be_stacked_leaves_the_body_float(tmp_path, caplog):
    path = testing.save(_growing_loop_model(), tmp_path / "model.onnx")
    samples = [{"input": RNG.standard_normal((2, 8)).astype(np.float32)} for _ in range(4)]
    data = testing.write_samples(tmp_path / "data", samples)
    calibration = qconvert.calibrate(path, data)
    assert "part" not in calibration.observers and "y" not in calibration.observers
    assert "cannot be passed out for calibration" in caplog.text
    report = qconvert.quantize(path, tmp_path / "q.onnx", data=data)
    assert report.conversion.quantized_ops == {}
    assert testing.output_sqnr(path, tmp_path / "q.onnx", samples) > 40.0
