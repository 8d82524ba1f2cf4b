"""The affine after a HardSwish is quantized down to its least value.

a * HardSwish(x) + b (PP-LCNet's and PP-OCRv4's learnable affine) can reach b - 0.375 a,
which calibration data rarely hit exactly; the range reaches it
(`plan.patterns.lowest_value`), past the rounded zero point.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qconvert import qparams, testing
from qconvert.calibration import TensorRange
from qconvert.plan import activations, patterns


def _values(model: ir.Model) -> dict[str, ir.Value]:
    return {out.name: out for node in model.graph for out in node.outputs}


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
