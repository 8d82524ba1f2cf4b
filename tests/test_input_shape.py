"""--input-shape: fixing a model's dynamic input dims before planning."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from qconvert import testing
from qconvert.runtime import make_session


def _sequence_model(tmp_path, lengths=(5, 5, 5)):
    model = testing.sequence_mlp()
    path = testing.save(model, tmp_path / "model.onnx")
    rng = np.random.default_rng(0)
    testing.write_samples(
        tmp_path / "calib",
        [{"tokens": rng.standard_normal((1, n, 8)).astype(np.float32)} for n in lengths],
    )
    return path


def _input_dims(path) -> list:
    value = onnx.load_model(str(path)).graph.input[0]
    return [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("scheme", ["int8", "fp16"])
def test_input_shape_fixes_dynamic_dims(run_cli, tmp_path, scheme):
    path = _sequence_model(tmp_path)
    out = tmp_path / "q.onnx"
    result = run_cli(
        "quantize",
        path,
        "--data",
        tmp_path / "calib",
        "--scheme",
        scheme,
        "--input-shape",
        "tokens:1x5x8",
        "-o",
        out,
    )
    assert result.code == 0, result.err
    assert _input_dims(out) == [1, 5, 8]
    assert _input_dims(path) == ["N", "L", 8]  # the input model is untouched


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("tokens", "--input-shape 'tokens' is not NAME:DIMS"),
        ("tokens:1xax8", "--input-shape 'tokens:1xax8' is not NAME:DIMS"),
        ("tokens:1x0x8", "--input-shape 'tokens:1x0x8' is not NAME:DIMS"),
        ("words:1x5x8", "--input-shape names input 'words', which the model does not have"),
        ("tokens:1x5", "--input-shape gives input 'tokens' 2 dims; the model gives it 3"),
        (
            "tokens:1x5x9",
            "--input-shape sets dim 2 of input 'tokens' to 9; the model fixes it at 8",
        ),
    ],
)
def test_bad_input_shapes_are_usage_errors(run_cli, tmp_path, option, message):
    path = _sequence_model(tmp_path)
    out = tmp_path / "q.onnx"
    result = run_cli(
        "quantize", path, "--data", tmp_path / "calib", "--input-shape", option, "-o", out
    )
    assert result.code == 2, result.err
    assert message in result.err
    assert not out.exists()


def test_samples_that_do_not_fit_the_fixed_shape_are_refused(run_cli, tmp_path):
    path = _sequence_model(tmp_path, lengths=(5, 7))
    out = tmp_path / "q.onnx"
    result = run_cli(
        "quantize",
        path,
        "--data",
        tmp_path / "calib",
        "--input-shape",
        "tokens:1x5x8",
        "-o",
        out,
    )
    assert result.code == 3, result.err
    assert "tokens" in result.err
    assert not out.exists()


def _fixed_length_model(tmp_path):
    """Input [N,L] reshaped to [N,4,2]: only L = 8 runs, which the model does not say."""
    from onnx import TensorProto
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    graph = h.make_graph(
        [
            h.make_node("Reshape", ["x", "shape"], ["r"], name="reshape"),
            h.make_node("MatMul", ["r", "w"], ["y"], name="mm"),
        ],
        "fixed_length",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "L"])],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 3])],
        [
            nh.from_array(np.array([-1, 4, 2], np.int64), "shape"),
            nh.from_array(rng.standard_normal((2, 3)).astype(np.float32), "w"),
        ],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    path = testing.save(model, tmp_path / "model.onnx")
    testing.write_samples(
        tmp_path / "data", [{"x": rng.standard_normal((1, 8)).astype(np.float32)}]
    )
    return path


@pytest.mark.parametrize("scheme", ["int8-dynamic", "fp16", "fp16-weights"])
def test_without_data_a_model_the_zeros_do_not_fit_is_verified_structurally(
    run_cli, tmp_path, scheme
):
    # The float model cannot run on the smoke sample (L = 1 does not reshape to [-1,4,2]):
    # that says nothing about the conversion, so the model is written, checked without a
    # run, and one warning says so with the options that would run it.
    path = _fixed_length_model(tmp_path)
    out = tmp_path / "q.onnx"
    report = tmp_path / "report.json"
    result = run_cli("quantize", path, "--scheme", scheme, "-o", out, "--report", report)
    assert result.code == 0, result.err
    warnings = [line for line in result.err.splitlines() if line.startswith("Warning: ")]
    assert len(warnings) == 1, result.err
    assert warnings[0].startswith("Warning: The converted model was verified structurally")
    assert "with the dynamic dims of 'x' set to 1" in warnings[0]
    assert "--input-shape x:1x1" in warnings[0] and "--data DIR" in warnings[0]
    notes = json.loads(report.read_text())["conversion"]["notes"]
    assert any(note.startswith("Verified structurally") for note in notes)
    feeds = {"x": np.random.default_rng(2).standard_normal((3, 8)).astype(np.float32)}
    want = make_session(str(path)).run(None, feeds)[0]
    got = make_session(str(out)).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max())
    for option in (("--input-shape", "x:1x8"), ("--data", tmp_path / "data")):
        result = run_cli("quantize", path, "--scheme", scheme, *option, "-o", out, "--force")
        assert result.code == 0, result.err
        assert "Warning: The converted model was verified structurally" not in result.err


def test_a_data_sample_the_float_model_cannot_run_is_not_blamed_on_the_conversion(
    run_cli, tmp_path
):
    path = _fixed_length_model(tmp_path)
    bad = testing.write_samples(
        tmp_path / "bad",
        [{"x": np.ones((1, 6), np.float32)}],  # 6 values: no [-1,4,2]
    )
    out = tmp_path / "q.onnx"
    result = run_cli("quantize", path, "--scheme", "int8-dynamic", "--data", bad, "-o", out)
    assert result.code == 0, result.err
    assert "the float model itself fails on sample" in result.err
    assert out.exists()


def test_outputs_already_nan_in_float_on_the_zeros_do_not_fail_verification(tmp_path):
    """x / x is NaN on the all-zero smoke sample in float too (as an all-masked attention
    is): verification holds the converted model only to what the float model does."""
    from onnx import TensorProto
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    graph = h.make_graph(
        [
            h.make_node("Div", ["x", "x"], ["ones"], name="div"),
            h.make_node("MatMul", ["ones", "w"], ["y"], name="mm"),
        ],
        "nan_on_zeros",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [nh.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    path = testing.save(model, tmp_path / "model.onnx")
    import qconvert
    from qconvert.config import QuantizeConfig

    for scheme in ("int8-dynamic", "fp16"):
        out = tmp_path / f"{scheme}.onnx"
        qconvert.quantize(path, out, config=QuantizeConfig(scheme=scheme))
        assert out.exists()


@pytest.mark.parametrize("scheme", ["int8-dynamic", "fp16", "fp16-weights"])
def test_a_detector_with_dynamic_height_and_width_converts_without_data(
    run_cli, tmp_path, scheme
):
    # As yolov8n: zeros of 1x1 pixels are smaller than the 3x3 kernels, so the float model
    # itself fails on the smoke sample; the conversion is still written and checked.
    rng = np.random.default_rng(0)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        detector (float[N,3,H,W] images) => (float[N,4,?,?] boxes) {
            c1 = Conv <kernel_shape = [3,3]> (images, w1, b1)
            r1 = Relu (c1)
            boxes = Conv <kernel_shape = [3,3]> (r1, w2, b2)
        }
    """
    model = onnx.parser.parse_model(text)
    for name, shape in (
        ("w1", (8, 3, 3, 3)),
        ("b1", (8,)),
        ("w2", (4, 8, 3, 3)),
        ("b2", (4,)),
    ):
        array = (rng.standard_normal(shape) * 0.3).astype(np.float32)
        model.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    path = testing.save(model, tmp_path / "detector.onnx")
    out = tmp_path / "q.onnx"
    result = run_cli("quantize", path, "--scheme", scheme, "-o", out)
    assert result.code == 0, result.err
    assert result.err.count("Warning: The converted model was verified structurally") == 1
    assert "--input-shape images:1x3x1x1" in result.err
    feeds = {"images": rng.standard_normal((1, 3, 16, 12)).astype(np.float32)}
    want = make_session(str(path)).run(None, feeds)[0]
    got = make_session(str(out)).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, atol=0.02 * np.abs(want).max())
