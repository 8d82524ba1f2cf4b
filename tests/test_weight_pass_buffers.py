"""The weight passes' and `auto`'s shortcuts: bounded work and memory, the same numbers.

With glibc's mmap threshold fixed at 128 KiB (`qconvert.memory`), every large temporary
is mapped and zeroed by the kernel: these check that the passes widen and multiply into
buffers made once, and that what they compute is what the plain formulas give.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qconvert.calibration import RangeMethod, TensorObserver, ranges, tensor_range
from qconvert.calibration.auto import CANDIDATES, choose_range
from qconvert.passes import adaround
from qconvert.passes.bias_correct import WIDEN_VALUES, channel_means

SHAPES = [
    ((1, 96, 112, 112), 1),  # a wide Conv input: more than one row per widened block
    ((2, 24, 56, 56), 1),  # a batch: each channel's row spans both samples
    ((1, 5, 70_000), 1),  # a row longer than a block
    ((1, 4, 3, 3), 1),
    ((8, 1280), -1),  # a Gemm input: channels last, rows not contiguous
    ((1, 1280), -1),
]


def _plain_means(runs, axes):
    """The definition: each channel's values widened to float64, summed, divided."""
    sums, counts = {}, {}
    for run in runs:
        for name, axis in axes.items():
            values = np.moveaxis(run[name].astype(np.float64), axis, 0)
            rows = values.reshape(values.shape[0], -1)
            sums[name] = sums.get(name, 0.0) + rows.sum(axis=1)
            counts[name] = counts.get(name, 0) + rows.shape[1]
    return {name: sums[name] / counts[name] for name in sums}


@pytest.mark.parametrize(("shape", "axis"), SHAPES)
def test_channel_means_are_the_float64_means_bit_for_bit(shape, axis):
    rng = np.random.default_rng(sum(shape))
    runs = [
        {"x": (rng.standard_normal(shape) * 30.0 + 7.0).astype(np.float32)} for _ in range(3)
    ]
    got = channel_means(runs, {"x": axis})["x"]
    assert got.tobytes() == _plain_means(runs, {"x": axis})["x"].tobytes()


def test_channel_means_widen_a_block_at_a_time_not_the_whole_tensor():
    x = np.random.default_rng(0).standard_normal((1, 96, 112, 112)).astype(np.float32)
    whole = x.size * 8  # the float64 copy of the whole tensor: 9.6 MB
    tracemalloc.start()
    try:
        channel_means([{"x": x}], {"x": 1})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= WIDEN_VALUES * 8 + 64 * 1024 < whole / 10


def _descend_case(groups, inputs, outputs, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((groups, 600, inputs)) * rng.uniform(0.2, 3.0, size=inputs)
    gram = np.matmul(x.transpose(0, 2, 1), x)
    scale = np.full((groups, inputs, outputs), 0.01) * rng.uniform(
        0.5, 2.0, (groups, 1, outputs)
    )
    ideal = rng.standard_normal((groups, inputs, outputs)) * 0.1 / scale
    return gram, ideal, np.clip(np.round(ideal), -127, 127), scale


@pytest.mark.parametrize(
    ("groups", "inputs", "outputs"), [(1, 200, 24), (16, 9, 1), (2, 45, 5)]
)
def test_descent_lowers_the_layer_error_with_floor_or_ceil_of_each_weight(
    groups, inputs, outputs
):
    gram, ideal, nearest, scale = _descend_case(groups, inputs, outputs, seed=inputs)
    chosen = adaround._descend(gram, ideal, nearest, scale, -127, 127)
    energy = adaround._energy(gram, (chosen - ideal) * scale)
    assert energy < adaround._energy(gram, (nearest - ideal) * scale)
    assert np.all(np.abs(chosen - ideal) < 1.0)  # still floor or ceil of each weight


def test_descent_blocks_share_buffers_made_once_per_layer(monkeypatch):
    gram, ideal, nearest, scale = _descend_case(1, 200, 24, seed=3)
    made = []
    real = adaround._Blocks.__init__
    monkeypatch.setattr(
        adaround._Blocks, "__init__", lambda self, *a: made.append(1) or real(self, *a)
    )
    products = []
    real_product = adaround._Blocks.product

    def product(self, *args):
        result = real_product(self, *args)
        products.append(result.ctypes.data)
        return result

    monkeypatch.setattr(adaround._Blocks, "product", product)
    adaround._descend(gram, ideal, nearest, scale, -127, 127)
    assert made == [1]
    assert len(products) > 5 and len(set(products)) == 1  # one product buffer, reused


def test_patch_positions_are_worked_out_once_per_shape(monkeypatch):
    graph = helper.make_graph(
        [
            helper.make_node(
                "Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1], strides=[2, 1]
            )
        ],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 17, 19])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    node = next(iter(ir.serde.deserialize_model(model).graph))
    rng = np.random.default_rng(0)
    samples = [rng.standard_normal((1, 3, 17, 19)).astype(np.float32) for _ in range(3)]
    worked_out = []
    real = adaround._patch_index
    monkeypatch.setattr(
        adaround, "_patch_index", lambda *key: worked_out.append(key) or real(*key)
    )
    grams = adaround.GramAccumulator([node], samples=len(samples))
    for x in samples:
        grams.update({"x": x})
    assert len(worked_out) == 1
    fresh = sum(
        np.matmul(p.transpose(0, 2, 1), p)
        for p in (adaround._patches(node, x, grams.per_sample) for x in samples)
    )
    assert len(worked_out) == 4  # without the accumulator's keeping: once a sample
    np.testing.assert_allclose(grams.result()["conv"], fresh, rtol=1e-12)


def _observer(values: np.ndarray) -> TensorObserver:
    observer = TensorObserver()
    observer.update(values.astype(np.float32))
    return observer


def test_auto_folds_each_tensors_histogram_once_and_chooses_as_each_method_alone(
    monkeypatch,
):
    rng = np.random.default_rng(0)
    heavy = rng.standard_normal(200_000)
    heavy[:2] = (400.0, -300.0)
    observers = [_observer(heavy), _observer(np.abs(rng.laplace(size=50_000)))]
    method = RangeMethod(name="auto")
    alone = [
        {name: tensor_range(o, RangeMethod(name=name)) for name in CANDIDATES}
        for o in observers
    ]
    folds = []
    real = ranges.abs_histogram
    monkeypatch.setattr(ranges, "abs_histogram", lambda o: folds.append(1) or real(o))
    for observer, expected in zip(observers, alone, strict=True):
        choice = choose_range(observer, method)
        assert choice.range == expected[choice.method]
    assert len(folds) == len(observers)


def _corrected_conv(out_channels, in_channels, group, kernel, seed):
    """A Conv node of int8 per-channel weights, its plan entry and its input means."""
    from types import SimpleNamespace

    from qconvert import qparams

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_channels, in_channels // group, kernel, kernel))
    b = rng.standard_normal(out_channels)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], group=group)],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(w.astype(np.float32), "w"),
            numpy_helper.from_array(b.astype(np.float32), "b"),
        ],
    )
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )
    node = next(iter(model.graph))
    params = qparams.weight_qparams(w.astype(np.float32), np.int8, axis=0)
    plan = SimpleNamespace(tensors={"w": SimpleNamespace(qparams=params)})
    return node, plan, {"x": rng.standard_normal(in_channels) + 2.0}, w, b


@pytest.mark.parametrize(
    ("out_channels", "in_channels", "group", "kernel"),
    [(64, 48, 1, 1), (32, 32, 32, 3), (16, 8, 2, 3)],
)
def test_bias_correction_subtracts_the_rounding_error_times_the_input_means(
    out_channels, in_channels, group, kernel
):
    from qconvert import qparams
    from qconvert.passes.bias_correct import correct_biases

    node, plan, means, w, b = _corrected_conv(out_channels, in_channels, group, kernel, 1)
    params = plan.tensors["w"].qparams
    w32 = w.astype(np.float32)
    error = qparams.dequantize(qparams.quantize(w32, params), params).astype(
        np.float64
    ) - w32.astype(np.float64)
    per_group = in_channels // group
    expected = b.astype(np.float32).astype(np.float64).copy()
    for o in range(out_channels):
        g = o // (out_channels // group)
        channel_means = means["x"][g * per_group : (g + 1) * per_group]
        expected[o] -= float(np.sum(error[o] * channel_means[:, None, None]))
    correct_biases(plan, [node], means)
    got = node.inputs[2].const_value.numpy()
    np.testing.assert_allclose(got, expected.astype(np.float32), rtol=1e-6, atol=1e-7)
    assert not np.allclose(got, b.astype(np.float32))


def test_bias_correction_holds_no_float64_copy_of_the_weight_beside_its_error():
    from qconvert.passes.bias_correct import correct_biases

    node, plan, means, w, _ = _corrected_conv(640, 480, 1, 1, 2)
    weight_f64 = w.size * 8  # 2.5 MB
    tracemalloc.start()
    try:
        correct_biases(plan, [node], means)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The error and its per-tap sums (float64), the rounding's float32 copies: about 2.6
    # weights in float64; widening the weight and indexing the means out took 4.5.
    assert peak < 3 * weight_f64
