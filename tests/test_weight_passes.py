"""--equalize and --bias-correction on tiny graphs where the effect is known."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import qconvert
from qconvert import testing
from qconvert.passes.equalize import EqualizePass
from qconvert.runtime import make_session


def _two_channel_pair(*, clip=False, r2=(1.0, 1.0)):
    rng = np.random.default_rng(0)
    w1 = rng.uniform(-1, 1, (2, 2, 3, 3)).astype(np.float32)
    w1[0] *= 10.0 / np.abs(w1[0]).max()  # r1 = (10, 0.1)
    w1[1] *= 0.1 / np.abs(w1[1]).max()
    w2 = rng.uniform(-1, 1, (2, 2, 3, 3)).astype(np.float32)
    w2 *= np.float32(r2).reshape(1, 2, 1, 1) / np.abs(w2).max(axis=(0, 2, 3), keepdims=True)
    b1 = np.array([0.5, -0.02], np.float32)
    return testing.conv_relu_conv(w1, b1, w2, clip=clip)


def _outputs(model, feeds):
    return make_session(model.SerializeToString()).run(None, feeds)[0]


def _equalized(model):
    ir_model = ir.from_proto(model)
    equalize = EqualizePass()
    equalize(ir_model)
    return ir.to_proto(ir_model), equalize.pairs


def _weights(model):
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def test_equalization_matches_channel_ranges_and_keeps_the_function():
    model = _two_channel_pair()
    rng = np.random.default_rng(1)
    feeds = {"input": rng.standard_normal((4, 2, 8, 8)).astype(np.float32)}
    equalized, pairs = _equalized(model)
    assert [(p.first, p.second) for p in pairs] == [("first", "second")]
    weights = _weights(equalized)
    r1 = np.abs(weights["w1"]).max(axis=(1, 2, 3))
    r2 = np.abs(weights["w2"]).max(axis=(0, 2, 3))
    np.testing.assert_allclose(r1, r2, rtol=1e-5)
    # s = sqrt(r1 / r2): channel ranges become sqrt(10 x 1) and sqrt(0.1 x 1).
    np.testing.assert_allclose(r1, [np.sqrt(10.0), np.sqrt(0.1)], rtol=1e-5)
    np.testing.assert_allclose(
        weights["b1"], [0.5 / np.sqrt(10), -0.02 / np.sqrt(0.1)], rtol=1e-5
    )
    np.testing.assert_allclose(
        _outputs(equalized, feeds), _outputs(model, feeds), rtol=1e-5, atol=1e-5
    )


def test_a_clip_pair_is_left_alone():
    model = _two_channel_pair(clip=True)
    equalized, pairs = _equalized(model)
    assert pairs == []
    np.testing.assert_array_equal(_weights(equalized)["w1"], _weights(model)["w1"])


def test_depthwise_second_conv_is_equalized_exactly():
    rng = np.random.default_rng(2)
    w1 = rng.uniform(-1, 1, (3, 2, 3, 3)).astype(np.float32)
    w1 *= np.float32([20, 1, 0.05]).reshape(3, 1, 1, 1)
    w2 = rng.uniform(-1, 1, (3, 1, 3, 3)).astype(np.float32)
    model = testing.conv_relu_conv(w1, np.zeros(3, np.float32), w2, group2=3)
    feeds = {"input": rng.standard_normal((2, 2, 8, 8)).astype(np.float32)}
    equalized, pairs = _equalized(model)
    assert len(pairs) == 1
    weights = _weights(equalized)
    np.testing.assert_allclose(
        np.abs(weights["w1"]).max(axis=(1, 2, 3)),
        np.abs(weights["w2"]).max(axis=(1, 2, 3)),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        _outputs(equalized, feeds), _outputs(model, feeds), rtol=1e-5, atol=1e-5
    )


def test_equalize_flag_improves_per_tensor_int8(run_cli, tmp_path):
    # Each conv's small channel gets about one int8 level of a per-tensor scale; after
    # equalization every channel range is 1.
    model = _two_channel_pair(r2=(0.1, 10.0))
    path = testing.save(model, tmp_path / "model.onnx")
    rng = np.random.default_rng(3)
    samples = [
        {"input": rng.standard_normal((1, 2, 8, 8)).astype(np.float32)} for _ in range(16)
    ]
    testing.write_samples(tmp_path / "calib", samples)
    sqnr = {}
    for flags in ((), ("--equalize",)):
        out = tmp_path / f"q{len(flags)}.onnx"
        result = run_cli(
            "quantize", path, "--data", tmp_path / "calib", "-o", out, "--per-tensor", *flags
        )
        assert result.code == 0, result.err
        sqnr[flags] = testing.output_sqnr(path, out, samples)
    assert sqnr[("--equalize",)] > sqnr[()] + 6.0


def test_bias_correction_removes_a_known_mean_shift(tmp_path):
    # Every weight sits 0.4 steps above a grid point of its channel's int8 scale, so the
    # quantized weights are all 0.4 steps low: a mean output shift of -0.4 s_o sum(E[x]).
    rng = np.random.default_rng(0)
    out_channels, k = 4, 16
    steps = rng.integers(-100, 100, (out_channels, k)).astype(np.float64)
    steps[:, 0] = 127  # sets each channel's scale to 1/127 exactly
    scale = 1.0 / 127
    w = np.where(steps == 127, 1.0, (steps + 0.4) * scale)
    b = np.zeros(out_channels)
    model = testing.gemm_bias(w, b)
    path = testing.save(model, tmp_path / "model.onnx")
    mean = np.full(k, 2.0)
    samples = [
        {"input": (mean + 0.1 * rng.standard_normal((1, k))).astype(np.float32)}
        for _ in range(64)
    ]
    testing.write_samples(tmp_path / "calib", samples)
    expected_shift = -0.4 * scale * (w != 1.0).astype(np.float64) @ mean
    reference = make_session(str(path))
    shifts = {}
    for correct in (False, True):
        out = tmp_path / f"q{correct}.onnx"
        qconvert.quantize(
            path,
            out,
            data=tmp_path / "calib",
            config=qconvert.QuantizeConfig(bias_correction=correct),
            recipe="fast",  # the single pass, without the recipe's own bias correction
        )
        candidate = make_session(str(out))
        errors = [candidate.run(None, s)[0] - reference.run(None, s)[0] for s in samples]
        shifts[correct] = np.mean(np.concatenate(errors), axis=0)
    np.testing.assert_allclose(shifts[False], expected_shift, rtol=0.1, atol=2e-3)
    assert np.abs(shifts[True]).max() < 0.1 * np.abs(expected_shift).max()


@pytest.mark.parametrize(
    ("args", "fragment", "code"),
    [
        (("--equalize", "--scheme", "fp16"), "--equalize does not go with --scheme", 2),
        (("--bias-correction", "--scheme", "int8-dynamic"), "--bias-correction does not", 2),
        (("--adaround", "--scheme", "fp16"), "--adaround does not go with --scheme fp16", 2),
    ],
)
def test_bad_weight_pass_options(run_cli, tiny_cnn, tmp_path, args, fragment, code):
    out = tmp_path / "bad.onnx"
    result = run_cli("quantize", tiny_cnn, "--data", tmp_path / "calib", "-o", out, *args)
    assert result.code == code, result.err
    assert fragment in result.err
    assert not out.exists()


def test_equalize_refuses_a_calibration_file(run_cli, tiny_cnn, tmp_path):
    calib = tmp_path / "model.calib.json"
    assert run_cli("calibrate", tiny_cnn, "--data", tmp_path / "calib", "-o", calib).code == 0
    out = tmp_path / "bad.onnx"
    result = run_cli("quantize", tiny_cnn, "--calib", calib, "-o", out, "--equalize")
    assert result.code == 2, result.err
    assert "--equalize does not go with --calib" in result.err
    assert not out.exists()


def test_adaround_cuts_the_weight_rounding_error_of_a_layer(tmp_path):
    # Inputs share one strong common component, so nearest rounding's errors add up along
    # it; choosing floor or ceil per weight can cancel them. Per-tensor weights with one
    # large entry make the grid coarse, so weight rounding dominates the output error.
    rng = np.random.default_rng(0)
    out_channels, k = 8, 32
    w = 0.05 * rng.standard_normal((out_channels, k))
    w[0, 0] = 1.0
    model = testing.gemm_bias(w, np.zeros(out_channels))
    path = testing.save(model, tmp_path / "model.onnx")
    common = rng.standard_normal((64, 1))
    inputs = 1.0 + common + 0.05 * rng.standard_normal((64, k))
    samples = [{"input": row[None].astype(np.float32)} for row in inputs]
    testing.write_samples(tmp_path / "calib", samples)
    sqnr, weights = {}, {}
    for flag in (False, True):
        out = tmp_path / f"q{flag}.onnx"
        report = qconvert.quantize(
            path,
            out,
            data=tmp_path / "calib",
            config=qconvert.QuantizeConfig(per_channel=False, adaround=flag),
            recipe="fast",  # without the flag, the single pass: nearest rounding
        )
        sqnr[flag] = testing.output_sqnr(path, out, samples)
        quantized = onnx.load(str(out))
        weights[flag] = next(
            onnx.numpy_helper.to_array(t).astype(np.int32)
            for t in quantized.graph.initializer
            if t.data_type == onnx.TensorProto.INT8 and t.dims == [out_channels, k]
        )
    assert any("Adaptive rounding: 1 " in note for note in report.conversion.notes)
    # Each weight went to a neighbouring grid point of nearest rounding's, no further.
    assert np.abs(weights[True] - weights[False]).max() == 1
    assert (weights[True] != weights[False]).any()
    assert sqnr[True] > sqnr[False] + 3.0
