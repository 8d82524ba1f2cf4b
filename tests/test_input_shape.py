"""--input-shape: fixing a model's dynamic input dims before planning."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from qconvert import testing


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
def test_without_data_a_model_the_zeros_do_not_fit_asks_for_input_shape(
    run_cli, tmp_path, scheme
):
    path = _fixed_length_model(tmp_path)
    out = tmp_path / "q.onnx"
    result = run_cli("quantize", path, "--scheme", scheme, "-o", out)
    assert result.code == 3, result.err
    assert "with the dynamic dims of 'x' set to 1" in result.err
    assert "--input-shape x:1x1" in result.err
    assert not out.exists()
    for option in (("--input-shape", "x:1x8"), ("--data", tmp_path / "data")):
        result = run_cli("quantize", path, "--scheme", scheme, *option, "-o", out, "--force")
        assert result.code == 0, result.err


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
