"""Models at ai.onnx opsets 1 to 6 are upgraded with the ONNX version converter.

onnxruntime has no kernels for many opset 1 to 6 ops (Relu-1, BatchNormalization-6), so
the model is raised before anything runs it; each case is checked against the same network
built by hand at opset 13.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qconvert
from qconvert import QuantizeConfig, testing
from qconvert.runtime import make_session

RNG_SEED = 0


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(RNG_SEED)
    return {
        "w": (rng.standard_normal((4, 2, 3, 3)) * 0.5).astype(np.float32),
        "scale": (1 + 0.2 * rng.standard_normal(4)).astype(np.float32),
        "bias": (0.1 * rng.standard_normal(4)).astype(np.float32),
        "mean": (0.1 * rng.standard_normal(4)).astype(np.float32),
        "var": (0.5 + rng.random(4)).astype(np.float32),
        "shape": np.array([1, -1], np.int64),
        "gw": (0.1 * rng.standard_normal((128, 5))).astype(np.float32),
        "gb": (0.1 * rng.standard_normal(5)).astype(np.float32),
    }


def _cnn(opset: int) -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu -> Upsample x2 (image), Reshape -> Gemm (logits).

    Written with each op's attributes at `opset` (6: BatchNormalization's is_test, Upsample's
    height_scale/width_scale, Gemm's broadcast; 13: Resize); initializers are graph inputs,
    as IR version 3 requires.
    """
    weights = _weights()
    old = opset < 7
    batch_norm = {"is_test": 1} if old else {}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization",
            ["conv", "scale", "bias", "mean", "var"],
            ["bn"],
            **batch_norm,
        ),
        helper.make_node("Relu", ["bn"], ["relu"]),
        helper.make_node("Reshape", ["x", "shape"], ["flat"]),
        helper.make_node(
            "Gemm", ["flat", "gw", "gb"], ["logits"], **({"broadcast": 1} if old else {})
        ),
    ]
    if old:
        nodes.append(
            helper.make_node(
                "Upsample",
                ["relu"],
                ["image"],
                height_scale=2.0,
                width_scale=2.0,
                mode="nearest",
            )
        )
    else:
        weights["roi"] = np.zeros(0, np.float32)
        weights["scales"] = np.array([1, 1, 2, 2], np.float32)
        nodes.append(
            helper.make_node(
                "Resize",
                ["relu", "roi", "scales"],
                ["image"],
                mode="nearest",
                coordinate_transformation_mode="asymmetric",
                nearest_mode="floor",
            )
        )
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])]
    if old:
        inputs += [
            helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape
            )
            for name, array in weights.items()
        ]
    graph = helper.make_graph(
        nodes,
        "old_cnn",
        inputs,
        [
            helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 4, 16, 16]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5]),
        ],
        [numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 3 if old else 8
    onnx.checker.check_model(model)
    return model


def _samples(count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((1, 2, 8, 8)).astype(np.float32)} for _ in range(count)]


def _relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float(np.abs(candidate - reference).max() / np.abs(reference).max())


@pytest.fixture(scope="module")
def old_cnn(tmp_path_factory):
    folder = tmp_path_factory.mktemp("old")
    path = testing.save(_cnn(6), folder / "opset6.onnx")
    testing.write_samples(folder / "calib", _samples(8))
    return path, folder / "calib"


@pytest.mark.parametrize(
    ("scheme", "opset", "bound"),
    [
        ("int8", 13, 0.05),
        ("16x8", 21, 0.03),  # int8 weights dominate the error
        ("int8-dynamic", 11, 0.05),
        ("fp16", 7, 0.01),
        ("fp16-weights", 7, 0.01),
    ],
)
def test_opset6_conv_gemm_batchnorm_reshape_upsample_upgrade(
    old_cnn, tmp_path, scheme, opset, bound
):
    path, calib = old_cnn
    out = tmp_path / "out.onnx"
    data = calib if scheme in ("int8", "16x8") else None
    report = qconvert.quantize(path, out, data=data, config=QuantizeConfig(scheme=scheme))
    written = onnx.load_model(str(out))
    assert {o.version for o in written.opset_import if o.domain in ("", "ai.onnx")} == {opset}
    ops = testing.count_ops(written)
    # Upsample became Resize at opset 10; fp16 needs no newer opset than onnxruntime's 7.
    assert ops["Upsample" if opset < 10 else "Resize"] == 1
    assert "BatchNormalization" not in ops  # folded into the Conv after the upgrade
    assert report.conversion.opset_before == 6 and report.conversion.opset_after == opset
    assert any("upgraded from opset 6" in note for note in report.conversion.notes)
    reference = make_session(_cnn(13).SerializeToString())
    converted = make_session(str(out))
    for feeds in _samples(4):
        for want, got in zip(
            reference.run(None, feeds), converted.run(None, feeds), strict=True
        ):
            assert _relative_error(want, got) < bound


def test_opset1_model_runs_only_after_the_upgrade(tmp_path):
    # Relu-1 has no onnxruntime kernel: calibration itself must run the upgraded model.
    weights = _weights()
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["conv"], ["y"]),
        ],
        "opset1",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 2, 3, 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(weights["w"], "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 1)])
    model.ir_version = 3
    path = testing.save(model, tmp_path / "opset1.onnx")
    with pytest.raises(Exception, match="Relu"):
        make_session(str(path)).run(None, _samples(1)[0])
    calib = testing.write_samples(tmp_path / "calib", _samples(8))
    out = tmp_path / "out.onnx"
    qconvert.quantize(path, out, data=calib)
    feeds = _samples(1)[0]
    want = np.maximum(
        make_session(_conv_only(weights)).run(None, feeds)[0], 0
    )  # the same Conv at opset 13, then Relu by hand
    got = make_session(str(out)).run(None, feeds)[0]
    assert _relative_error(want, got) < 0.05


def _conv_only(weights: dict[str, np.ndarray]) -> bytes:
    text = """
        <ir_version: 8, opset_import: ["" : 13]>
        conv (float[1,2,8,8] x) => (float[1,4,8,8] y) {
            y = Conv <pads = [1,1,1,1]> (x, w)
        }
    """
    model = onnx.parser.parse_model(text)
    model.graph.initializer.append(numpy_helper.from_array(weights["w"], "w"))
    return model.SerializeToString()


def test_calibrate_then_quantize_an_opset6_model(old_cnn, tmp_path, run_cli):
    path, calib = old_cnn
    calibration = tmp_path / "model.calib.json"
    result = run_cli("calibrate", path, "--data", calib, "-o", calibration)
    assert result.code == 0, result.err
    out = tmp_path / "out.onnx"
    result = run_cli("quantize", path, "--calib", calibration, "-o", out)
    assert result.code == 0, result.err
    reference = make_session(_cnn(13).SerializeToString())
    feeds = _samples(1)[0]
    got = make_session(str(out)).run(None, feeds)
    for want, value in zip(reference.run(None, feeds), got, strict=True):
        assert _relative_error(want, value) < 0.05


def test_failed_upgrade_names_the_op_and_the_opset_step(tmp_path, run_cli):
    # Upsample-1 has no shape inference, so the Gemm 6 -> 7 adapter cannot see the shape
    # of the input it reads through Reshape: the ONNX converter gives up there.
    rng = np.random.default_rng(0)
    weights = {
        "shape": np.array([1, -1], np.int64),
        "gw": (0.1 * rng.standard_normal((128, 5))).astype(np.float32),
        "gb": np.zeros(5, np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node(
                "Upsample", ["x"], ["up"], height_scale=2.0, width_scale=2.0, mode="nearest"
            ),
            helper.make_node("Reshape", ["up", "shape"], ["flat"]),
            helper.make_node("Gemm", ["flat", "gw", "gb"], ["y"], broadcast=1),
        ],
        "unshaped",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
            helper.make_tensor_value_info("gw", TensorProto.FLOAT, [128, 5]),
            helper.make_tensor_value_info("gb", TensorProto.FLOAT, [5]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        [numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)])
    model.ir_version = 3
    onnx.checker.check_model(model)
    path = testing.save(model, tmp_path / "old.onnx")
    out = tmp_path / "out.onnx"
    result = run_cli("quantize", path, "--scheme", "fp16", "-o", out)
    assert result.code == 3, result.err
    assert result.err.strip().splitlines() == [
        "Error: The model's opset 6 cannot be upgraded to 7: the ONNX version converter "
        "fails on 'Gemm' at the step from opset 6 to 7 (Shape of input 0 is not "
        "available.). Hint: export the model again at a newer opset."
    ]
    assert not out.exists()
