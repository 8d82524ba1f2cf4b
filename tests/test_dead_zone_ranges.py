"""Activation ranges that follow the HardSwish around them.

A Conv output read through scale, shift and HardSwish is quantized from the HardSwish's 0,
and the affine after a HardSwish down to its least value.

PP-OCRv4's blocks write Conv -> Mul(a) -> Add(b) -> HardSwish: every Conv output value
below (-3 - b) / a gives the same 0 after the HardSwish, so the quantized range starts
there (`plan.patterns.dead_below`), and the values that matter get finer steps.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

import qconvert
from qconvert import qparams, testing
from qconvert.calibration import TensorRange
from qconvert.plan import activations, patterns


def _samples(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"input": rng.standard_normal((1, 4, 16, 16)).astype(np.float32)} for _ in range(count)
    ]


def _values(model: ir.Model) -> dict[str, ir.Value]:
    return {out.name: out for node in model.graph for out in node.outputs}


def test_the_bound_is_found_through_scale_and_shift():
    model = ir.from_proto(testing.pointwise_hardswish_depthwise(spread=1.0))
    values = _values(model)
    # h -> Mul(2) -> Add(0.5) -> HardSwish: 2 h + 0.5 <= -3 where h <= -1.75.
    assert patterns.dead_below(values["h"]) == -1.75
    assert patterns.dead_below(values["t1"]) == -3.0
    # t2 is read by a Conv, which sees every value: no bound.
    assert patterns.dead_below(values["t2"]) is None
    assert patterns.dead_below(values["g"]) is None


def test_a_negative_scale_or_a_second_reader_leaves_the_range_whole():
    proto = testing.pointwise_hardswish_depthwise(spread=1.0)
    for initializer in proto.graph.initializer:
        if initializer.name == "a1":
            initializer.CopyFrom(numpy_helper.from_array(np.float32(-2.0), "a1"))
    assert patterns.dead_below(_values(ir.from_proto(proto))["h"]) is None
    proto = testing.pointwise_hardswish_depthwise(spread=1.0)
    proto.graph.output.append(onnx.helper.make_empty_tensor_value_info("h"))
    assert patterns.dead_below(_values(ir.from_proto(proto))["h"]) is None


def _quantize(tmp_path, name):
    path = testing.save(
        testing.pointwise_hardswish_depthwise(spread=1.0), tmp_path / "model.onnx"
    )
    if not (tmp_path / "calib").exists():
        testing.write_samples(tmp_path / "calib", _samples(32, seed=1))
    out = tmp_path / f"{name}.onnx"
    qconvert.quantize(path, out, data=tmp_path / "calib", recipe="fast")
    return path, out


def test_the_range_starts_where_the_hardswish_is_zero_and_the_output_gains(
    tmp_path, monkeypatch
):
    path, trimmed = _quantize(tmp_path, "trimmed")
    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(trimmed).graph.initializer}
    scale, zero_point = float(weights["h_scale"]), int(weights["h_zp"])
    # The lowest level is the bound, to within half a step (the zero point is an integer).
    assert abs((0 - zero_point) * scale - -1.75) <= scale / 2
    with monkeypatch.context() as patch:
        patch.setattr(activations, "dead_below", lambda value: None)
        _, whole = _quantize(tmp_path, "whole")
    whole_weights = {
        i.name: numpy_helper.to_array(i) for i in onnx.load(whole).graph.initializer
    }
    assert (0 - int(whole_weights["h_zp"])) * float(whole_weights["h_scale"]) < -3.0
    held = _samples(16, seed=2)
    gained = testing.output_sqnr(path, trimmed, held) - testing.output_sqnr(path, whole, held)
    assert gained > 0.5, gained


def test_the_least_value_after_a_hardswish_is_found_through_scale_and_shift():
    values = _values(ir.from_proto(testing.pointwise_hardswish_depthwise(spread=1.0)))
    assert patterns.lowest_value(values["g"]) == -0.375
    # t2 = 0.7 g - 0.2: at least 0.7 x -0.375 - 0.2.
    assert abs(patterns.lowest_value(values["t2"]) - (-0.4625)) < 1e-7
    assert patterns.lowest_value(values["h"]) is None  # a Conv output: unbounded


def test_the_range_reaches_the_least_value_and_its_level_past_the_rounded_zero_point():
    seen = TensorRange(min=-0.0562, max=3.53)
    # Half a step of the widened range further down: the zero point round(4.46) = 4
    # would otherwise leave the lowest level at -4 x 0.01409 = -0.0564, above -0.0628.
    widened = activations._down_to_lowest(seen, -0.0628, 255)
    assert widened.max == 3.53
    assert abs(widened.min - (-0.0628 - 0.5 * (3.53 + 0.0628) / 255)) < 1e-12
    params = qparams.range_qparams(widened.min, widened.max, np.uint8, symmetric=False)
    assert (0 - int(params.zero_point)) * float(params.scale) <= -0.0628
    # More than one bit of resolution to reach it: left as calibrated.
    assert activations._down_to_lowest(seen, -5.0, 255) is seen
    assert activations._down_to_lowest(seen, None, 255) is seen
