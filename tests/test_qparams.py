"""Scale/zero-point math against values computed by hand, and against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from qconvert import qparams
from qconvert.runtime import make_session


def test_asymmetric_uint8_by_hand():
    # [-1, 3]: scale = 4/255, zero point = round(1 / (4/255)) = round(63.75) = 64.
    p = qparams.range_qparams(-1.0, 3.0, np.uint8, symmetric=False)
    assert p.scale == np.float32(4.0 / 255.0)
    assert p.zero_point == 64
    assert p.zero_point.dtype == np.uint8


def test_symmetric_int8_uses_127_both_sides():
    # max |r| = 2.54 -> scale = 2 * 2.54 / 254 = 0.02, zero point 0.
    p = qparams.range_qparams(-1.0, 2.54, np.int8, symmetric=True)
    assert p.scale == np.float32(0.02)
    assert p.zero_point == 0
    assert qparams.integer_range(np.int8, symmetric=True) == (-127, 127)


def test_symmetric_uint8_puts_zero_in_the_middle():
    p = qparams.range_qparams(-1.0, 1.0, np.uint8, symmetric=True)
    assert p.zero_point == 128
    assert p.scale == np.float32(2.0 / 255.0)


def test_all_zero_tensor_gets_scale_one_not_zero():
    p = qparams.range_qparams(0.0, 0.0, np.uint8, symmetric=False)
    assert p.scale == 1.0
    assert p.zero_point == 0
    q = qparams.weight_qparams(np.zeros((4, 3), np.float32), np.int8, axis=0)
    np.testing.assert_array_equal(q.scale, np.ones(4, np.float32))


def test_range_that_excludes_zero_is_widened_to_contain_it():
    # [2, 5] becomes [0, 5]: scale = 5/255, zero point 0, and 0.0 is exactly representable.
    p = qparams.range_qparams(2.0, 5.0, np.uint8, symmetric=False)
    assert p.scale == np.float32(5.0 / 255.0)
    assert p.zero_point == 0
    # [-4, -1] becomes [-4, 0]: zero point at the top.
    n = qparams.range_qparams(-4.0, -1.0, np.uint8, symmetric=False)
    assert n.zero_point == 255


def test_per_channel_weights_one_scale_per_slice_of_the_axis():
    w = np.array([[1.0, -2.0], [0.5, 0.25], [-127.0, 3.0]], dtype=np.float32)
    p = qparams.weight_qparams(w, np.int8, axis=0)
    np.testing.assert_array_equal(p.scale, np.float32([2.0, 0.5, 127.0]) / np.float32(127.0))
    np.testing.assert_array_equal(p.zero_point, np.zeros(3, np.int8))
    np.testing.assert_array_equal(qparams.quantize(w, p)[:, 0], [64, 127, -127])
    columns = qparams.weight_qparams(w, np.int8, axis=1)
    np.testing.assert_allclose(columns.scale, np.float32([127.0, 3.0]) / 127.0, rtol=1e-7)


def test_reduce_range_keeps_seven_bits():
    assert qparams.integer_range(np.uint8, reduce_range=True) == (0, 127)
    assert qparams.integer_range(np.int8, symmetric=True, reduce_range=True) == (-64, 64)


def test_bias_scale_is_input_scale_times_weight_scale():
    p = qparams.bias_qparams(np.float32(0.5), np.float32([0.1, 0.2]))
    np.testing.assert_array_equal(p.scale, np.float32([0.05, 0.1]))
    assert p.zero_point.dtype == np.int32
    assert p.axis == 0


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_numpy_quantize_matches_onnxruntime_quantize_linear(dtype):
    rng = np.random.default_rng(0)
    # Values on exact half steps check round-half-to-even; large values check saturation.
    x = np.concatenate(
        [rng.standard_normal(200) * 3, np.arange(-10, 10) * 0.05 + 0.025, [1e6, -1e6]]
    ).astype(np.float32)
    p = qparams.range_qparams(-2.0, 2.5, dtype, symmetric=False)
    onnx_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])],
        "q",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [x.size])],
        [onnx.helper.make_tensor_value_info("y", onnx_type, [x.size])],
        [
            onnx.numpy_helper.from_array(p.scale.reshape(()), "s"),
            onnx.numpy_helper.from_array(p.zero_point.reshape(()), "z"),
        ],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    model.ir_version = 8
    (expected,) = make_session(model.SerializeToString()).run(None, {"x": x})
    np.testing.assert_array_equal(qparams.quantize(x, p), expected)
    roundtrip = qparams.dequantize(qparams.quantize(x[:200], p), p)
    inside = (x[:200] > -2.0) & (x[:200] < 2.5)
    assert np.max(np.abs(roundtrip - x[:200])[inside]) <= p.scale / 2 + 1e-6


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16])
def test_numpy_dequantize_matches_onnxruntime_dequantize_linear_bit_for_bit(dtype):
    # Per channel, with odd scales and zero points across the type's whole range: the
    # float32 arithmetic dequantize takes for 8- and 16-bit values gives the bits
    # DequantizeLinear gives.
    rng = np.random.default_rng(1)
    info = np.iinfo(dtype)
    q = rng.integers(info.min, info.max + 1, size=(6, 5, 3, 3)).astype(dtype)
    scale = (rng.random(6) * 1e-2 + 1e-7).astype(np.float32)
    zero_point = rng.integers(info.min, info.max + 1, size=6).astype(dtype)
    p = qparams.QParams(scale=scale, zero_point=zero_point, axis=0)
    onnx_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=0)],
        "dq",
        [onnx.helper.make_tensor_value_info("q", onnx_type, list(q.shape))],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, list(q.shape))],
        [
            onnx.numpy_helper.from_array(scale, "s"),
            onnx.numpy_helper.from_array(zero_point, "z"),
        ],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
    model.ir_version = 10
    (expected,) = make_session(model.SerializeToString()).run(None, {"q": q})
    got = qparams.dequantize(q, p)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_weight_scale_is_raised_so_a_large_bias_fits_int32():
    # Input scale 1e-8 and weight scale 0.01 would store the bias 0.5 as 5e9: over int32.
    weights = np.array([[1.27, -0.5]], np.float32)
    weight = qparams.weight_qparams(weights, np.int8, axis=None)
    assert weight.scale == np.float32(0.01)
    fitted = qparams.fit_weight_scale_to_bias(
        weight, weights, np.float32(1e-8), np.float32([0.5])
    )
    expected = 0.5 / (1e-8 * 2**30)
    assert fitted.scale == pytest.approx(expected, rel=1e-6)
    bias = qparams.bias_qparams(np.float32(1e-8), fitted.scale)
    assert abs(0.5 / bias.scale) <= 2**30 * (1 + 1e-6)


def test_all_zero_weight_channel_takes_the_finest_scale_its_bias_allows():
    weights = np.array([[0.0, 0.0], [1.27, 0.0]], np.float32)
    weight = qparams.weight_qparams(weights, np.int8, axis=0)
    np.testing.assert_array_equal(weight.scale, np.float32([1.0, 0.01]))
    bias = np.float32([0.3, 0.2])
    fitted = qparams.fit_weight_scale_to_bias(weight, weights, np.float32(0.1), bias)
    assert fitted.scale[0] == pytest.approx(0.3 / (0.1 * 2**30), rel=1e-6)
    assert fitted.scale[1] == np.float32(0.01)  # a real channel keeps its scale
    untouched = qparams.fit_weight_scale_to_bias(
        weight, weights, np.float32(0.1), np.float32([0.0, 0.2])
    )
    assert untouched is weight


@pytest.mark.parametrize(
    ("dtype", "symmetric", "axis"),
    [(np.int8, True, 0), (np.int8, True, None), (np.uint8, False, 0), (np.int8, True, 1)],
)
def test_zero_channels_are_found_from_each_channels_extremes_as_from_every_value(
    dtype, symmetric, axis
):
    # Channels of zeros, of values under half a step (they round to the zero point), of
    # denormals, and of ordinary weights: the shortcut must agree with quantizing them all.
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(6, 5, 3, 3)).astype(np.float32)
    weights[1] = 0.0
    weights[2] = np.float32(1e-40)
    weights[3] *= np.float32(1e-4)
    weights[4, 0, 0, 0] = np.float32(0.2)  # one value a step away from the zero point
    params = qparams.weight_qparams(weights, dtype, axis=axis, symmetric=symmetric)
    params = qparams.QParams(
        scale=np.maximum(params.scale, np.float32(0.05)), zero_point=params.zero_point,
        axis=axis,
    )  # fmt: skip
    shape = qparams._broadcast_shape(params, weights.ndim)
    every_value = qparams.quantize(weights, params) == params.zero_point.reshape(shape)
    other = tuple(i for i in range(4) if axis is None or i != axis)
    expected = np.all(every_value, axis=other)
    found = np.all(qparams._stored_as_zero_point(weights, params), axis=other)
    np.testing.assert_array_equal(found, expected)
    if axis == 0:
        assert list(expected) == [False, True, True, True, False, False]
