"""Regressions found by the ONNX node-test corpus (`tools/corpus.py`), each built in code.

Each was an internal error (exit 70), or a verification failure that blamed the
conversion for what the float model already did.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qconvert
from qconvert import QuantizeConfig, testing
from qconvert.runtime import make_session


def _parse(text: str, initializers: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    for name, array in (initializers or {}).items():
        model.graph.initializer.append(numpy_helper.from_array(array, name))
    onnx.checker.check_model(model)  # full_check trips on MVN's own function body
    return model


def _run(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> list:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return make_session(source).run(None, feeds)


def test_scaled_read_inside_a_loop_body_stays_in_the_body(tmp_path):
    # The DequantizeLinear that replaces a folded Mul went to the main graph, reading a
    # value of the body: the checker refused the written model (exit 4).
    model = testing.loop_matmul_scaled_sigmoid()
    path = testing.save(model, tmp_path / "loop.onnx")
    rng = np.random.default_rng(1)
    samples = [{"input": rng.standard_normal((2, 8)).astype(np.float32)} for _ in range(8)]
    calib = testing.write_samples(tmp_path / "calib", samples)
    out = tmp_path / "out.onnx"
    qconvert.quantize(path, out, data=calib)
    written = onnx.load_model(str(out))
    onnx.checker.check_model(written)
    body = written.graph.node[-1].attribute[0].g
    ops = [node.op_type for node in body.node]
    assert "Mul" not in ops and "DequantizeLinear" in ops  # the Mul became a body DQ
    assert testing.output_sqnr(model, out, samples) > 25


def test_upgrade_that_changes_an_input_rank_is_refused(tmp_path, run_cli):
    # Scan 8 takes a batch axis that Scan 9 drops: the upgraded model would not take the
    # data. It was an internal error (the refusal came wrapped in a PassError).
    body = helper.make_graph(
        [helper.make_node("Add", ["sum_in", "next"], ["sum_out"])],
        "body",
        [
            helper.make_tensor_value_info("sum_in", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("next", TensorProto.FLOAT, [2]),
        ],
        [helper.make_tensor_value_info("sum_out", TensorProto.FLOAT, [2])],
    )
    graph = helper.make_graph(
        [helper.make_node("Scan", ["", "initial", "x"], ["y"], body=body, num_scan_inputs=1)],
        "scan8",
        [
            helper.make_tensor_value_info("initial", TensorProto.FLOAT, [1, 2]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    onnx.checker.check_model(model)
    path = testing.save(model, tmp_path / "scan8.onnx")
    rng = np.random.default_rng(0)
    sample = {
        "initial": rng.standard_normal((1, 2)).astype(np.float32),
        "x": rng.standard_normal((1, 3, 2)).astype(np.float32),
    }
    testing.write_samples(tmp_path / "calib", [sample])
    out = tmp_path / "out.onnx"
    result = run_cli("quantize", path, "--data", tmp_path / "calib", "-o", out)
    assert result.code == 3, result.err
    assert result.err.strip().splitlines() == [
        "Error: The model's opset 8 cannot be upgraded to 13: the ONNX version converter "
        "changes the type or rank of input 'initial', so the model would no longer take "
        "its data. Hint: export the model again at a newer opset."
    ]
    assert not out.exists()


def test_model_importing_no_ai_onnx_opset_is_written_unchanged(tmp_path):
    # Only ai.onnx.ml ops: the opset upgrade had nothing to convert and failed (exit 70).
    graph = helper.make_graph(
        [
            helper.make_node(
                "Scaler", ["x"], ["y"], domain="ai.onnx.ml", offset=[0.5], scale=[2.0]
            )
        ],
        "ml_only",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("ai.onnx.ml", 1)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = testing.save(model, tmp_path / "ml.onnx")
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    testing.write_samples(tmp_path / "calib", [feeds])
    for scheme in ("int8", "int8-dynamic", "fp16"):
        out = tmp_path / f"{scheme}.onnx"
        data = tmp_path / "calib" if scheme == "int8" else None
        report = qconvert.quantize(path, out, data=data, config=QuantizeConfig(scheme=scheme))
        assert report.conversion.quantized_ops == {}
        assert any(note.startswith("Nothing to convert") for note in report.conversion.notes)
        np.testing.assert_array_equal(_run(out, feeds)[0], (feeds["x"] - 0.5) * 2.0)


FP16_CASES = {
    "scatter_with_reduction": (
        """<ir_version: 8, opset_import: ["" : 18]>
        g (float[4,3] data, float[2,3] updates) => (float[4,3] y) {
            y = ScatterElements <axis = 0, reduction = "mul"> (data, idx, updates)
        }""",
        {"idx": np.array([[0, 1, 2], [3, 0, 1]], np.int64)},
        {"data": (4, 3), "updates": (2, 3)},
    ),
    "bitcast": (
        """<ir_version: 10, opset_import: ["" : 26]>
        g (float[2,3] x) => (int32[2,3] y) {
            r = Relu (x)
            y = BitCast <to = 6> (r)
        }""",
        {},
        {"x": (2, 3)},
    ),
    "mean_variance_normalization": (
        """<ir_version: 8, opset_import: ["" : 13]>
        g (float[1,3,4,4] x) => (float[1,3,4,4] y) {
            y = MeanVarianceNormalization (x)
        }""",
        {},
        {"x": (1, 3, 4, 4)},
    ),
    "sequence": (
        """<ir_version: 8, opset_import: ["" : 13]>
        g (float[4,3] x) => (float[4,3] y) {
            r = Relu (x)
            s = SplitToSequence <axis = 0> (r)
            y = ConcatFromSequence <axis = 0> (s)
        }""",
        {},
        {"x": (4, 3)},
    ),
}


@pytest.mark.parametrize("case", sorted(FP16_CASES))
def test_fp16_keeps_float32_what_onnxruntime_runs_only_in_float32(tmp_path, case):
    # Each failed onnxruntime's load or run once converted: no float16 kernel (reducing
    # scatters), a width-bound output type (BitCast), a float32 function body (MVN), or
    # sequence types the pass did not rewrite.
    text, initializers, shapes = FP16_CASES[case]
    model = _parse(text, initializers)
    path = testing.save(model, tmp_path / "model.onnx")
    rng = np.random.default_rng(0)
    feeds = {
        name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()
    }
    out = tmp_path / "out.onnx"
    # With data, fp16 measures every float tensor's peak: sequences included, once.
    data = testing.write_samples(tmp_path / "data", [feeds])
    qconvert.quantize(path, out, data=data, config=QuantizeConfig(scheme="fp16"))
    for want, got in zip(_run(model, feeds), _run(out, feeds), strict=True):
        if want.dtype == np.float32:
            np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-3)
        else:
            np.testing.assert_array_equal(got, want)


def test_sequence_output_is_verified_without_error(tmp_path):
    # Verification turned every output into an array: a sequence output raised (exit 70).
    model = _parse(
        """<ir_version: 8, opset_import: ["" : 13]>
        g (float[4,3] x) => (seq(float[?,3]) y) {
            m = MatMul (x, w)
            y = SplitToSequence <axis = 0> (m, parts)
        }""",
        {
            "w": np.random.default_rng(0).standard_normal((3, 3)).astype(np.float32),
            "parts": np.array([1, 3], np.int64),  # uneven: no one array holds both
        },
    )
    path = testing.save(model, tmp_path / "model.onnx")
    rng = np.random.default_rng(1)
    samples = [{"x": rng.standard_normal((4, 3)).astype(np.float32)} for _ in range(4)]
    calib = testing.write_samples(tmp_path / "calib", samples)
    for scheme in ("int8", "int8-dynamic"):
        out = tmp_path / f"{scheme}.onnx"
        qconvert.quantize(path, out, data=calib, config=QuantizeConfig(scheme=scheme))
        want, got = _run(model, samples[0])[0], _run(out, samples[0])[0]
        assert len(got) == len(want) == 2
        for a, b in zip(want, got, strict=True):
            np.testing.assert_allclose(b, a, atol=0.1 * np.abs(a).max())


def test_outputs_already_infinite_in_float_on_the_data_are_not_blamed(tmp_path, run_cli):
    # Log(0) is -inf in float already; with --data the converted model was refused (exit
    # 4) for giving the same -inf.
    model = _parse(
        """<ir_version: 8, opset_import: ["" : 13]>
        g (float[2,3] x) => (float[2,3] y, float[2,3] z) {
            y = Log (x)
            m = MatMul (x, w)
            z = Relu (m)
        }""",
        {"w": np.eye(3, dtype=np.float32)},
    )
    path = testing.save(model, tmp_path / "model.onnx")
    sample = {"x": np.array([[0, 1, 2], [3, 4, 5]], np.float32)}
    testing.write_samples(tmp_path / "calib", [sample])
    for scheme in ("int8", "int8-dynamic", "fp16"):
        out = tmp_path / f"{scheme}.onnx"
        result = run_cli(
            "quantize", path, "--data", tmp_path / "calib", "--scheme", scheme, "-o", out
        )
        assert result.code == 0, result.err
        got = _run(out, sample)
        assert got[0][0, 0] == -np.inf
        np.testing.assert_allclose(got[0][1], np.log(sample["x"][1]), rtol=1e-2)


def test_model_onnxruntime_cannot_load_is_refused_without_data(tmp_path, run_cli):
    model = _parse(
        """<ir_version: 8, opset_import: ["" : 13, "com.example" : 1]>
        g (float[2,3] x) => (float[2,3] y) {
            m = MatMul (x, w)
            y = com.example.Missing (m)
        }""",
        {"w": np.eye(3, dtype=np.float32)},
    )
    path = testing.save(model, tmp_path / "model.onnx")
    out = tmp_path / "out.onnx"
    result = run_cli("quantize", path, "--scheme", "int8-dynamic", "-o", out)
    assert result.code == 3, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: onnxruntime cannot load the model:")
    assert "Missing" in lines[0] and "Traceback" not in result.err
    assert not out.exists()


def test_sequence_types_survive_preparation_through_if_branches(tmp_path):
    # onnx_ir's shape inference wrote the If's sequence output as a float tensor, and
    # onnxruntime refused the prepared model the calibration runs. Calibration then bound
    # the scalar condition as a numpy scalar, which has no buffer to bind (exit 70).
    model = _parse(
        """<ir_version: 8, opset_import: ["" : 13]>
        g (bool flag, float[2,3] x) => (float[4,3] y) {
            r = Relu (x)
            s = If (flag) <
                then_branch = then_body () => (seq(float[2,3]) a) {
                    a = SequenceConstruct (r, r)
                },
                else_branch = else_body () => (seq(float[2,3]) b) {
                    b = SequenceConstruct (x, r)
                }
            >
            y = ConcatFromSequence <axis = 0> (s)
        }"""
    )
    path = testing.save(model, tmp_path / "model.onnx")
    rng = np.random.default_rng(0)
    samples = [
        {"flag": np.array(flag), "x": rng.standard_normal((2, 3)).astype(np.float32)}
        for flag in (True, False)
    ]
    data = testing.write_samples(tmp_path / "data", samples)
    for scheme in ("int8", "fp16"):
        out = tmp_path / f"{scheme}.onnx"
        qconvert.quantize(path, out, data=data, config=QuantizeConfig(scheme=scheme))
        for feeds in samples:
            want, got = _run(model, feeds)[0], _run(out, feeds)[0]
            np.testing.assert_allclose(got, want, atol=0.02 * np.abs(want).max())
