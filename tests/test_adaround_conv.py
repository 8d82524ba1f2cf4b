"""Adaptive rounding of Conv, depthwise Conv and ConvTranspose weights (passes.adaround)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qconvert
from qconvert import testing
from qconvert.overrides import Overrides
from qconvert.passes import adaround as rounding
from qconvert.pipelines import weight_passes
from qconvert.plan import QuantPlan, Role, TensorDecision
from qconvert.qparams import quantize, weight_qparams
from qconvert.schemes import INT8

LAYERS = {
    "conv": ("Conv", (8, 4, 3, 3), {"pads": [1, 1, 1, 1], "strides": [2, 2]}, (1, 4, 9, 9)),
    "depthwise": (
        "Conv",
        (6, 1, 3, 3),
        {"pads": [1, 0, 1, 0], "group": 6, "dilations": [2, 1]},
        (1, 6, 8, 7),
    ),
    "grouped_1d": ("Conv", (6, 2, 3), {"pads": [1, 1], "group": 3}, (1, 6, 10)),
    "conv_transpose": (
        "ConvTranspose",
        (4, 3, 3, 3),
        {"pads": [1, 1, 1, 1], "strides": [2, 2]},
        (1, 4, 5, 5),
    ),
    "grouped_transpose": (
        "ConvTranspose",
        (4, 2, 2, 2),
        {"strides": [2, 2], "group": 2},
        (1, 4, 5, 5),
    ),
}


def _layer(op, weight, attributes, input_shape, bias=None):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inputs = ["x", "w"] + (["b"] if bias is not None else [])
    node = helper.make_node(op, inputs, ["y"], name="layer", **attributes)
    initializers = [numpy_helper.from_array(weight.astype(np.float32), "w")]
    if bias is not None:
        initializers.append(numpy_helper.from_array(bias.astype(np.float32), "b"))
    graph = helper.make_graph([node], "g", [x], [y], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("case", sorted(LAYERS))
def test_the_layer_gram_gives_the_output_error_onnxruntime_measures(case):
    # e^T H e must be the energy of the change a weight change e makes to the layer's
    # output: the patches (strides, pads, dilations, groups, the transpose's spread-out
    # input and flipped kernel) are those the layer really multiplies.
    op, shape, attributes, input_shape = LAYERS[case]
    rng = np.random.default_rng(0)
    weight = rng.standard_normal(shape)
    change = 0.01 * rng.standard_normal(shape)
    model = _layer(op, weight, attributes, input_shape)
    node = next(iter(ir.serde.deserialize_model(model).graph))
    samples = [rng.standard_normal(input_shape) for _ in range(3)]
    grams = rounding.layer_grams([{"x": x} for x in samples], [node], samples=3)
    to_columns, from_columns = rounding._layout(node, weight.shape)
    np.testing.assert_array_equal(from_columns(to_columns(weight)), weight)
    before = ort.InferenceSession(model.SerializeToString())
    after = ort.InferenceSession(
        _layer(op, weight + change, attributes, input_shape).SerializeToString()
    )
    measured = sum(
        float(
            np.sum(
                (
                    before.run(None, {"x": x.astype(np.float32)})[0].astype(np.float64)
                    - after.run(None, {"x": x.astype(np.float32)})[0]
                )
                ** 2
            )
        )
        for x in samples
    )
    predicted = rounding._energy(grams["layer"], to_columns(change))
    assert predicted == pytest.approx(measured, rel=1e-3)


@pytest.mark.parametrize("case", ["conv", "depthwise", "conv_transpose"])
def test_adaround_lowers_the_output_error_of_conv_layers(case, tmp_path):
    # Inputs share a strong common component (as image channels do), so nearest
    # rounding's errors add up along it; per-tensor weights make the grid coarse.
    op, shape, attributes, input_shape = LAYERS[case]
    rng = np.random.default_rng(1)
    weight = 0.1 * rng.standard_normal(shape)
    weight.reshape(-1)[0] = 1.0
    out_channels = shape[1] * attributes.get("group", 1) if op == "ConvTranspose" else shape[0]
    model = _layer(op, weight, attributes, ("N", *input_shape[1:]), np.zeros(out_channels))
    path = testing.save(model, tmp_path / "model.onnx")
    common = rng.standard_normal((48, 1, 1, 1)[: len(input_shape)])
    samples = [
        {"x": (1.0 + common[i] + 0.1 * rng.standard_normal(input_shape)).astype(np.float32)}
        for i in range(48)
    ]
    testing.write_samples(tmp_path / "calib", samples)
    # A lone ConvTranspose writing the graph output has no integer reader, so the plan
    # computes it in float on its float input (test_float_island_layers); the override
    # keeps it a quantized layer, the one weight rounding serves.
    overrides = Overrides(nodes={"layer": "int8"}) if op == "ConvTranspose" else Overrides()
    sqnr = {}
    for flag in (False, True):
        out = tmp_path / f"q{flag}.onnx"
        report = qconvert.quantize(
            path,
            out,
            data=tmp_path / "calib",
            config=qconvert.QuantizeConfig(
                per_channel=False, adaround=flag, overrides=overrides
            ),
            recipe="fast",
        )
        sqnr[flag] = testing.output_sqnr(path, out, samples)
    assert any(f"Adaptive rounding: 1 {op} weight" in note for note in report.conversion.notes)
    assert sqnr[True] > sqnr[False] + 1.0, sqnr


def test_wide_depthwise_patches_are_multiplied_before_they_pile_up(monkeypatch):
    # A depthwise 5x5 layer of many groups holds groups x rows x 25 patch values a
    # sample: they are multiplied into H once a block passes PENDING_BYTES, not held
    # for every layer until the last sample, and H is the same either way.
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(64, 1, 5, 5))
    model = _layer("Conv", weight, {"pads": [2, 2, 2, 2], "group": 64}, (1, 64, 16, 16))
    node = ir.from_proto(model).graph.node(0)
    samples = [{"x": rng.normal(size=(1, 64, 16, 16))} for _ in range(8)]

    def grams_and_peak(limit: int) -> tuple[np.ndarray, int]:
        monkeypatch.setattr(rounding, "PENDING_BYTES", limit)
        accumulator = rounding.GramAccumulator([node], samples=len(samples))
        peak = 0
        for run in samples:
            accumulator.update(run)
            held = sum(part.nbytes for parts in accumulator.pending.values() for part in parts)
            peak = max(peak, held)
        return accumulator.result()["layer"], peak

    unbounded, unbounded_peak = grams_and_peak(1 << 40)
    bounded, bounded_peak = grams_and_peak(64 << 10)
    one_sample = 64 * (rounding.MAX_ROWS // len(samples)) * 25 * 8
    assert unbounded_peak >= 7 * one_sample  # without the bound, every sample is held
    assert bounded_peak < (64 << 10) + one_sample
    np.testing.assert_allclose(bounded, unbounded, rtol=1e-12, atol=1e-9)


def test_a_wide_layers_h_is_summed_in_place():
    # A 1,024-wide MatMul's H is 8 MB; each block of rows adds its product to it. Summed
    # into a new array, three H were held at once (H, the product, the sum); the product
    # whole in a scratch, two; added a block of columns at a time, one H and a scratch of
    # at most PENDING_BYTES.
    rng = np.random.default_rng(4)
    k = 1024
    model = _layer("MatMul", rng.normal(size=(k, 8)), {}, (1, 256, k))
    node = ir.from_proto(model).graph.node(0)
    runs = [{"x": rng.normal(size=(1, 256, k))} for _ in range(4)]  # 2 MB a run: a block
    accumulator = rounding.GramAccumulator([node], samples=len(runs))
    h_bytes = k * k * 8
    tracemalloc.start()
    try:
        for run in runs:
            accumulator.update(run)
        gram = accumulator.result()["layer"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rows = np.concatenate([run["x"].reshape(-1, k) for run in runs])
    np.testing.assert_allclose(gram[0], rows.T @ rows, rtol=1e-9, atol=1e-9)
    run_bytes = 256 * k * 8
    assert peak < h_bytes + rounding.PENDING_BYTES + 3 * run_bytes, (peak, h_bytes)


@pytest.mark.parametrize("axis", [0, None])
def test_rounding_a_layer_holds_no_weight_sized_scale_or_float64_weight(axis):
    # A layer's rounding holds weight-sized float64 arrays at once (its ideal values, its
    # choices, their errors, H e). The scale and zero point are views of their vectors
    # and the weight is read as the model's float32. Here 9.6 weight-sized arrays at
    # most before, 7.1 now (a 1-D Conv of 512 x 256 x 5 weights: 46 -> 33 MB).
    rng = np.random.default_rng(6)
    weight = rng.standard_normal((128, 64, 5)).astype(np.float32)
    model = _layer("Conv", weight, {"pads": [2, 2]}, (1, 64, 16))
    node = ir.from_proto(model).graph.node(0)
    rows = rng.standard_normal((512, 64 * 5))
    gram = (rows.T @ rows)[None]
    params = weight_qparams(weight, np.int8, axis=axis)
    plan = QuantPlan(
        scheme=INT8,
        tensors={"w": TensorDecision(name="w", role=Role.WEIGHT, qparams=params, reason="")},
        nodes=(),
        folds=(),
    )
    tracemalloc.start()
    try:
        values, before, after = rounding._round_layer(node, plan, gram)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * weight.size * 8, peak / (weight.size * 8)
    # The choices are grid points, at most one step from nearest, and lower e^T H e.
    assert after < before
    levels = quantize(values, params).astype(np.int64)
    nearest = quantize(weight, params).astype(np.int64)
    scale = params.scale.reshape(-1, 1, 1) if axis == 0 else params.scale
    np.testing.assert_allclose(values, levels * scale, rtol=1e-6, atol=0)
    assert np.abs(levels - nearest).max() == 1


def test_layers_rounded_a_float_pass_at_a_time_round_as_all_at_once(monkeypatch, tmp_path):
    # With GRAM_BYTES of one byte, each layer's H is measured in a float pass of its own,
    # after the layers before it were rounded: H must still be that of the float model's
    # inputs, so the written model is the one all layers measured at once give.
    rng = np.random.default_rng(3)
    model = testing.conv_relu_conv(
        0.3 * rng.standard_normal((6, 3, 3, 3)),
        0.1 * rng.standard_normal(6),
        0.3 * rng.standard_normal((4, 6, 3, 3)),
    )
    path = testing.save(model, tmp_path / "model.onnx")
    samples = [testing.random_inputs(model, seed=seed) for seed in range(40)]
    testing.write_samples(tmp_path / "calib", samples)
    passes, grams = [], {}
    layer_grams = weight_passes.layer_grams

    def measured(runs, nodes, samples):
        passes.append([node.name for node in nodes])
        found = layer_grams(runs, nodes, samples)
        grams.update(found)
        return found

    monkeypatch.setattr(weight_passes, "layer_grams", measured)
    written, measured_grams = {}, {}
    for budget in (1, 1 << 30):
        monkeypatch.setattr(rounding, "GRAM_BYTES", budget)
        passes.clear()
        out = tmp_path / f"q{budget}.onnx"
        report = qconvert.quantize(
            path,
            out,
            data=tmp_path / "calib",
            config=qconvert.QuantizeConfig(per_channel=False, adaround=True),
            recipe="fast",
        )
        assert any("Adaptive rounding: 2 Conv weight" in n for n in report.conversion.notes)
        assert passes == ([["first"], ["second"]] if budget == 1 else [["first", "second"]])
        written[budget] = out.read_bytes()
        measured_grams[budget] = dict(grams)
    for name in ("first", "second"):
        np.testing.assert_allclose(measured_grams[1][name], measured_grams[1 << 30][name])
    assert written[1] == written[1 << 30]
    nearest = tmp_path / "nearest.onnx"
    qconvert.quantize(
        path,
        nearest,
        data=tmp_path / "calib",
        config=qconvert.QuantizeConfig(per_channel=False),
        recipe="fast",
    )
    assert nearest.read_bytes() != written[1]  # rounding chose other grid points


@pytest.mark.parametrize("case", ["conv", "depthwise", "grouped_1d"])
def test_conv_patches_are_the_padded_input_under_the_kernel_exactly(case):
    # Every output position, read by hand from a zero-padded copy of the input: the rows
    # H is built from must be these values exactly (H is summed from them in float64,
    # and the rounding it chooses must not move with how they are gathered).
    op, shape, attributes, input_shape = LAYERS[case]
    rng = np.random.default_rng(2)
    model = _layer(op, rng.standard_normal(shape), attributes, input_shape)
    node = next(iter(ir.serde.deserialize_model(model).graph))
    x = rng.standard_normal((2, *input_shape[1:])).astype(np.float32)
    one_d = len(input_shape) == 3
    image = x[:, :, None, :] if one_d else x
    kernel = (1, shape[2]) if one_d else shape[2:]
    pads = attributes.get("pads", [0] * 2 * (len(input_shape) - 2))
    pads = (0, pads[0], 0, pads[1]) if one_d else pads
    strides = (
        (1, *attributes.get("strides", [1])) if one_d else attributes.get("strides", [1, 1])
    )
    dilations = attributes.get("dilations", [1, 1])
    group = attributes.get("group", 1)
    padded = np.pad(image, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    reach = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    out = [(padded.shape[2 + i] - reach[i]) // strides[i] + 1 for i in range(2)]
    per_group = image.shape[1] // group
    expected = np.zeros((group, 2 * out[0] * out[1], per_group * kernel[0] * kernel[1]))
    for g in range(group):
        row = 0
        for n in range(2):
            for oy in range(out[0]):
                for ox in range(out[1]):
                    window = padded[
                        n,
                        g * per_group : (g + 1) * per_group,
                        oy * strides[0] : oy * strides[0] + reach[0] : dilations[0],
                        ox * strides[1] : ox * strides[1] + reach[1] : dilations[1],
                    ]
                    expected[g, row] = window.reshape(-1)
                    row += 1
    patches = rounding._patches(node, x, out[0] * out[1])
    assert patches.dtype == np.float64
    np.testing.assert_array_equal(patches, expected)


@pytest.mark.parametrize("op", ["Conv", "MatMul"])
def test_float32_rows_wait_as_float32_and_give_the_float64_rows_h(monkeypatch, op):
    # Rows waiting for their product were held as float64: twice the bytes of the
    # float32 tensor they come from, for every layer at once. Held as float32 and
    # widened when multiplied, H is the same bits in one block; in many, the sum of the
    # blocks' float64 products (added a block of columns at a time: not the same bits).
    rng = np.random.default_rng(5)
    if op == "Conv":
        model = _layer(
            "Conv", rng.normal(size=(8, 6, 3, 3)), {"pads": [1, 1, 1, 1]}, (1, 6, 12, 12)
        )
        shape = (1, 6, 12, 12)
    else:
        model = _layer("MatMul", rng.normal(size=(40, 8)), {}, (1, 30, 40))
        shape = (1, 30, 40)
    node = ir.from_proto(model).graph.node(0)
    runs = [{"x": rng.normal(size=shape).astype(np.float32)} for _ in range(5)]

    def rows_of(x: np.ndarray) -> np.ndarray:  # one sample's rows, widened first
        if op == "Conv":
            return rounding._patches(node, x.astype(np.float64), per_sample)
        return x.astype(np.float64).reshape(1, -1, shape[-1])

    per_sample = rounding.GramAccumulator([node], samples=len(runs)).per_sample
    for limit, blocks in ((1 << 40, [runs]), (1, [[run] for run in runs])):
        monkeypatch.setattr(rounding, "PENDING_BYTES", limit)
        accumulator = rounding.GramAccumulator([node], samples=len(runs))
        held = []
        for run in runs:
            accumulator.update(run)
            held.append(sum(p.nbytes for ps in accumulator.pending.values() for p in ps))
        gram = accumulator.result()["layer"]
        expected = None
        for block in blocks:
            rows = np.concatenate([rows_of(run["x"]) for run in block], axis=1)
            product = np.matmul(rows.transpose(0, 2, 1), rows)
            expected = product if expected is None else expected + product
        if len(blocks) == 1:
            assert np.array_equal(gram, expected)
            float64_bytes = sum(rows_of(run["x"]).nbytes for run in runs)
            assert held[-1] * 2 == float64_bytes, (held, float64_bytes)
        else:
            np.testing.assert_allclose(gram, expected, rtol=1e-13, atol=1e-12)
            assert max(held) == 0
