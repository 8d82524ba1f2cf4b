"""Rules for the activations and heads of real CNNs (MobileNetV3-style blocks, classifiers).

Each test builds the structure in code, so the effect of the rule is known by construction:
preparation rewrites keep the float function (to float rounding), the quantized model has
the expected layout and parameters, and onnxruntime runs it.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

import qconvert
from qconvert import testing
from qconvert.passes.prepare import prepare
from qconvert.plan import HEAD_FLOAT_MAX_WEIGHTS
from qconvert.runtime import make_session

C = 4


def _model(nodes, inits, *, opset=17, out_shape=("N", C, 8, 8)) -> onnx.ModelProto:
    graph = h.make_graph(
        nodes,
        "rules",
        [h.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [h.make_tensor_value_info("output", TensorProto.FLOAT, list(out_shape))],
        [nh.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _conv_weights(c_out: int, c_in: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((c_out, c_in, 3, 3)) * 0.3


def _conv(name: str, x: str, out: str, *, bias: bool = True) -> onnx.NodeProto:
    inputs = [x, f"{name}_w", f"{name}_b"] if bias else [x, f"{name}_w"]
    return h.make_node("Conv", inputs, [out], name=name, pads=[1, 1, 1, 1])


def _samples(count: int, *, scale: float = 1.0, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"input": (rng.standard_normal((1, 3, 8, 8)) * scale).astype(np.float32)}
        for _ in range(count)
    ]


def _prepared_outputs(model: onnx.ModelProto, samples, *, min_opset: int = 13):
    """The prepared model (as ONNX) and its outputs beside the float model's."""
    prepared = ir.serde.serialize_model(
        prepare(ir.serde.deserialize_model(model), min_opset=min_opset)
    )
    before = make_session(model.SerializeToString())
    after = make_session(prepared.SerializeToString())
    pairs = [(before.run(None, s)[0], after.run(None, s)[0]) for s in samples]
    return prepared, pairs


def _quantize(model, tmp_path, samples, **options):
    path = testing.save(model, tmp_path / "model.onnx")
    calib = testing.write_samples(tmp_path / "calib", samples)
    out = tmp_path / "model.int8.onnx"
    report = qconvert.quantize(path, out, data=calib, **options)
    return path, out, report


def _initializers(path) -> dict[str, np.ndarray]:
    model = onnx.load_model(str(path))
    return {t.name: nh.to_array(t) for t in model.graph.initializer}


def _scale_of(path, tensor: str) -> float:
    """The scale of the QuantizeLinear that writes `tensor`'s quantized copy."""
    model = onnx.load_model(str(path))
    inits = _initializers(path)
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.output[0] == f"{tensor}_q":
            return float(inits[node.input[1]])
    raise AssertionError(f"no QuantizeLinear writes {tensor}")


def test_constant_per_channel_add_after_conv_becomes_its_bias(tmp_path):
    shift = np.arange(C, dtype=np.float32).reshape(1, C, 1, 1)
    model = _model(
        [
            _conv("conv", "input", "c", bias=False),
            h.make_node("Add", ["c", "shift"], ["added"], name="add"),
            h.make_node("Relu", ["added"], ["r"], name="relu"),
            _conv("conv2", "r", "output"),
        ],
        {
            "conv_w": _conv_weights(C, 3, 0),
            "shift": shift,
            "conv2_w": _conv_weights(C, C, 1),
            "conv2_b": np.zeros(C),
        },
    )
    samples = _samples(16)
    prepared, pairs = _prepared_outputs(model, samples)
    assert testing.count_ops(prepared)["Add"] == 0
    conv = next(n for n in prepared.graph.node if n.name == "conv")
    bias = {t.name: nh.to_array(t) for t in prepared.graph.initializer}[conv.input[2]]
    np.testing.assert_array_equal(bias, shift.reshape(C))
    assert conv.output[0] == "added"  # the name calibration saw
    for before, after in pairs:
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)

    path, out, report = _quantize(model, tmp_path, samples)
    assert "Add" not in testing.count_ops(out)
    assert report.conversion.quantized_ops["Conv"] == 2
    assert testing.output_sqnr(path, out, samples) > 30.0


def test_an_add_whose_constant_varies_in_space_is_not_a_bias():
    model = _model(
        [
            _conv("conv", "input", "c", bias=False),
            h.make_node("Add", ["c", "plane"], ["output"], name="add"),
        ],
        {"conv_w": _conv_weights(C, 3, 0), "plane": np.ones((1, 1, 8, 8))},
    )
    prepared, _ = _prepared_outputs(model, _samples(1))
    assert testing.count_ops(prepared)["Add"] == 1


def test_affine_scale_and_shift_after_conv_fold_into_its_weight_and_bias(tmp_path):
    # scale * Conv(x) + shift, per channel then scalar, before the activation: the
    # learnable affine layer some mobile backbones put after each Conv.
    scale = np.array([0.5, -2.0, 1.5, 3.0], np.float32).reshape(C, 1, 1)
    model = _model(
        [
            _conv("conv", "input", "c"),
            h.make_node("Mul", ["scale", "c"], ["scaled"], name="affine_scale"),
            h.make_node("Add", ["scaled", "shift"], ["shifted"], name="affine_shift"),
            h.make_node("Relu", ["shifted"], ["r"], name="relu"),
            _conv("conv2", "r", "output"),
        ],
        {
            "conv_w": _conv_weights(C, 3, 0),
            "conv_b": np.arange(C) * 0.1,
            "scale": scale,
            "shift": np.array([0.25]),
            "conv2_w": _conv_weights(C, C, 1),
            "conv2_b": np.zeros(C),
        },
    )
    samples = _samples(16)
    prepared, pairs = _prepared_outputs(model, samples)
    assert testing.count_ops(prepared) == {"Conv": 2, "Relu": 1}
    conv = next(n for n in prepared.graph.node if n.name == "conv")
    inits = {t.name: nh.to_array(t) for t in prepared.graph.initializer}
    np.testing.assert_allclose(
        inits[conv.input[1]], _conv_weights(C, 3, 0) * scale.reshape(C, 1, 1, 1), rtol=1e-6
    )
    np.testing.assert_allclose(
        inits[conv.input[2]], np.arange(C) * 0.1 * scale.reshape(C) + 0.25, rtol=1e-6
    )
    assert conv.output[0] == "shifted"  # the name calibration saw
    for before, after in pairs:
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)

    path, out, _ = _quantize(model, tmp_path, samples)
    assert testing.count_ops(out)["Mul"] == 0
    assert testing.count_ops(out)["Add"] == 0
    assert testing.output_sqnr(path, out, samples) > 30.0


def test_a_mul_by_a_spatial_map_after_conv_is_not_a_scale():
    model = _model(
        [
            _conv("conv", "input", "c"),
            h.make_node("Mul", ["c", "plane"], ["output"], name="mul"),
        ],
        {
            "conv_w": _conv_weights(C, 3, 0),
            "conv_b": np.zeros(C),
            "plane": np.linspace(0, 1, 64).reshape(1, 1, 8, 8),
        },
    )
    prepared, pairs = _prepared_outputs(model, _samples(2))
    assert testing.count_ops(prepared)["Mul"] == 1
    for before, after in pairs:
        np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


def _squeeze_excite(opset: int = 17) -> onnx.ModelProto:
    """conv -> Relu -> GAP -> se conv -> HardSigmoid (the gate) -> Mul with the map -> conv."""
    return _model(
        [
            _conv("conv", "input", "x"),
            h.make_node("Relu", ["x"], ["r"], name="relu"),
            h.make_node("GlobalAveragePool", ["r"], ["pooled"], name="pool"),
            _conv("se", "pooled", "logit"),
            h.make_node("HardSigmoid", ["logit"], ["gate"], name="gate", alpha=0.2, beta=0.5),
            h.make_node("Mul", ["r", "gate"], ["scaled"], name="excite"),
            _conv("conv2", "scaled", "output"),
        ],
        {
            "conv_w": _conv_weights(C, 3, 0),
            "conv_b": np.zeros(C),
            "se_w": _conv_weights(C, C, 1),
            "se_b": np.full(C, 0.5),
            "conv2_w": _conv_weights(C, C, 2),
            "conv2_b": np.zeros(C),
        },
        opset=opset,
    )


def test_hardsigmoid_after_conv_folds_into_the_conv_and_a_clip(tmp_path):
    model = _squeeze_excite()
    samples = _samples(16)
    prepared, pairs = _prepared_outputs(model, samples)
    ops = testing.count_ops(prepared)
    assert ops["HardSigmoid"] == 0 and ops["Clip"] == 1
    inits = {t.name: nh.to_array(t) for t in prepared.graph.initializer}
    se = next(n for n in prepared.graph.node if n.name == "se")
    np.testing.assert_allclose(inits[se.input[1]], _conv_weights(C, C, 1) * 0.2, rtol=1e-6)
    np.testing.assert_allclose(inits[se.input[2]], np.full(C, 0.5 * 0.2 + 0.5), rtol=1e-6)
    for before, after in pairs:
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)

    path, out, _report = _quantize(model, tmp_path, samples)
    # The Clip is absorbed by the quantization of the se conv's output; the gate's range
    # is the Clip's [0, 1] (calibration covered over half of it): scale 1/255.
    assert "Clip" not in testing.count_ops(out) and "HardSigmoid" not in testing.count_ops(out)
    assert _scale_of(out, "gate") == np.float32(1.0 / 255.0)
    kernels = testing.optimized_ops(out, tmp_path)
    # conv and se run as integer kernels (conv2 writes the float graph output).
    assert kernels["QLinearConv"] == 2 and kernels["QLinearMul"] == 1, kernels
    assert testing.output_sqnr(path, out, samples) > 25.0


def _hardswish_block(opset: int, *, divide: bool = True) -> onnx.ModelProto:
    """conv -> x * Clip(x + 3, 0, 6) / 6 (or * 1/6) -> conv, as Paddle exports HardSwish."""
    last = (
        h.make_node("Div", ["m", "six"], ["hs"], name="div")
        if divide
        else h.make_node("Mul", ["sixth", "m"], ["hs"], name="div")
    )
    return _model(
        [
            _conv("conv", "input", "x"),
            h.make_node("Add", ["x", "three"], ["shifted"], name="add"),
            h.make_node("Clip", ["shifted", "zero", "six"], ["clipped"], name="clip"),
            h.make_node("Mul", ["x", "clipped"], ["m"], name="mul"),
            last,
            _conv("conv2", "hs", "output"),
        ],
        {
            "conv_w": _conv_weights(C, 3, 0) * 4,
            "conv_b": np.zeros(C),
            "three": np.float32(3.0),
            "zero": np.float32(0.0),
            "six": np.float32(6.0),
            "sixth": np.float32(1.0 / 6.0),
            "conv2_w": _conv_weights(C, C, 1),
            "conv2_b": np.zeros(C),
        },
        opset=opset,
    )


def test_hardswish_spelled_in_four_ops_becomes_one(tmp_path):
    samples = _samples(16)
    variants = ((17, True, {"HardSwish": 1}), (11, False, {"HardSigmoid": 1}))
    for opset, divide, fused in variants:
        model = _hardswish_block(opset, divide=divide)
        prepared, pairs = _prepared_outputs(model, samples, min_opset=opset)
        ops = testing.count_ops(prepared)
        assert ops["Div"] == ops["Add"] == ops["Clip"] == 0, ops
        assert all(ops[op] == n for op, n in fused.items()), ops
        for before, after in pairs:
            np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)

    model = _hardswish_block(17)
    path, out, _report = _quantize(model, tmp_path, samples)
    ops = testing.count_ops(out)
    # One float HardSwish; the only Muls left are the Cast-and-Mul reads of the int8
    # weights of the Conv before it, which computes in float (a thin Conv island).
    assert ops["HardSwish"] == 1 and ops["Div"] == ops["Add"] == 0, ops
    assert ops["Mul"] == ops["Cast"] == 1, ops
    assert testing.output_sqnr(path, out, samples) > 25.0


def test_an_opset_upgrade_goes_to_hardswish_opset_when_the_model_spells_it_out():
    spelled = _hardswish_block(11)
    prepared, pairs = _prepared_outputs(spelled, _samples(4), min_opset=13)
    assert prepared.opset_import[0].version == 14
    assert testing.count_ops(prepared)["HardSwish"] == 1
    for before, after in pairs:
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    # Without the pattern the scheme's own opset serves; at the model's own opset (as
    # calibration prepares it) nothing is raised.
    plain = _hardswish_block(11)
    _set_initializer(plain, "six", np.float32(5.0))
    prepared, _ = _prepared_outputs(plain, _samples(1), min_opset=13)
    assert prepared.opset_import[0].version == 13
    own, _ = _prepared_outputs(spelled, _samples(1), min_opset=1)
    assert own.opset_import[0].version == 11


def _set_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            tensor.CopyFrom(nh.from_array(array, name))


def test_a_clip_of_other_bounds_is_not_hardswish():
    model = _hardswish_block(17)
    _set_initializer(model, "six", np.float32(5.0))
    prepared, _ = _prepared_outputs(model, _samples(1))
    assert testing.count_ops(prepared)["HardSwish"] == 0


def _sigmoid_map(scale_w: float) -> onnx.ModelProto:
    return _model(
        [
            _conv("conv", "input", "x"),
            h.make_node("Sigmoid", ["x"], ["s"], name="sigmoid"),
            _conv("conv2", "s", "output"),
        ],
        {
            "conv_w": _conv_weights(C, 3, 0) * scale_w,
            "conv_b": np.full(C, -4.0),
            "conv2_w": _conv_weights(C, C, 1),
            "conv2_b": np.zeros(C),
        },
    )


def test_a_bounded_output_is_quantized_over_its_bounds_when_calibration_covers_half(
    tmp_path,
):
    # conv_b = -4: the sigmoid sits near 0; large weights reach past 0.5 on calibration,
    # small ones stay below 0.1 of its [0, 1].
    wide = tmp_path / "wide"
    wide.mkdir()
    _, out, _ = _quantize(_sigmoid_map(3.0), wide, _samples(16))
    assert _scale_of(out, "s") == np.float32(1.0 / 255.0)

    narrow = tmp_path / "narrow"
    narrow.mkdir()
    _, out, _ = _quantize(_sigmoid_map(0.05), narrow, _samples(16))
    assert _scale_of(out, "s") < 0.5 / 255.0


def _classifier(classes: int = 8) -> onnx.ModelProto:
    """conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> Softmax."""
    rng = np.random.default_rng(3)
    return _model(
        [
            _conv("conv", "input", "x"),
            h.make_node("Relu", ["x"], ["r"], name="relu"),
            h.make_node("GlobalAveragePool", ["r"], ["pooled"], name="pool"),
            h.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
            h.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
            h.make_node("Softmax", ["logits"], ["output"], name="softmax", axis=1),
        ],
        {
            "conv_w": _conv_weights(C, 3, 0),
            "conv_b": np.zeros(C),
            "fc_w": rng.standard_normal((classes, C)),
            "fc_b": np.zeros(classes),
        },
        out_shape=("N", classes),
    )


def _patches(count: int, rows: int, *, seed: int) -> list[dict]:
    """Noise on the first `rows` rows of the image, zero elsewhere."""
    samples = _samples(count, seed=seed)
    for sample in samples:
        sample["input"][:, :, rows:, :] = 0.0
    return samples


def test_a_classifier_head_after_global_pooling_computes_in_float(tmp_path):
    # Calibrated on images with one small active patch, evaluated on fully active ones:
    # the feature maps keep their range, their means (the pooled features) and the logits
    # grow past the calibrated range, where a quantized head would clip them.
    path, out, report = _quantize(_classifier(), tmp_path, _patches(16, 1, seed=0))
    floats = {node.name: node.reason for node in report.conversion.float_nodes}
    assert "last weighted layer" in floats["fc"] and "int8" in floats["fc"]
    assert "flatten" in floats and "pool" not in floats
    # The pooling reads int8 values (the Conv runs as an integer kernel): it averages them
    # on their own grid, which no mean can leave, so nothing clips.
    assert report.conversion.quantized_ops == {"Conv": 1, "Relu": 1, "GlobalAveragePool": 1}
    assert _scale_of(out, "pooled") == _scale_of(out, "r")
    kernels = testing.optimized_ops(out, tmp_path)
    assert kernels["QLinearGlobalAveragePool"] == 1 and kernels["QLinearConv"] == 1, kernels
    inits = _initializers(out)
    assert inits["fc_w_q"].dtype == np.int8  # stored as int8 all the same
    assert "fc_b" in inits and inits["fc_b"].dtype == np.float32

    strong = _patches(64, 8, seed=1)
    reference, candidate = (make_session(str(p)) for p in (path, out))
    agree = np.mean(
        [
            reference.run(None, s)[0].argmax() == candidate.run(None, s)[0].argmax()
            for s in strong
        ]
    )
    # With the head quantized (calibrated ranges on the pooled features and logits) the
    # top-1 agrees on 59 % of these samples.
    assert agree >= 0.9


def test_a_large_classifier_head_stays_quantized(tmp_path):
    # Above HEAD_FLOAT_MAX_WEIGHTS a float head would dequantize its weights on every run.
    classes = HEAD_FLOAT_MAX_WEIGHTS // C + 1
    _, _out, report = _quantize(_classifier(classes), tmp_path, _samples(4))
    assert report.conversion.quantized_ops["Gemm"] == 1
    assert report.conversion.quantized_ops["GlobalAveragePool"] == 1


def _gated_hardswish_block(opset: int) -> onnx.ModelProto:
    """conv -> x * HardSigmoid(x; 1/6, 1/2) -> conv, as PyTorch exports HardSwish below 14."""
    return _model(
        [
            _conv("conv", "input", "x"),
            h.make_node(
                "HardSigmoid", ["x"], ["gate"], name="gate", alpha=1.0 / 6.0, beta=0.5
            ),
            h.make_node("Mul", ["x", "gate"], ["hs"], name="mul"),
            _conv("conv2", "hs", "output"),
        ],
        {
            "conv_w": _conv_weights(C, 3, 0) * 4,
            "conv_b": np.zeros(C),
            "conv2_w": _conv_weights(C, C, 1),
            "conv2_b": np.zeros(C),
        },
        opset=opset,
    )


def test_hardswish_gated_by_a_hardsigmoid_becomes_one_where_the_opset_allows(tmp_path):
    samples = _samples(16)
    # Raised from 11 to the scheme's 13, and on to 14 for it: one HardSwish.
    prepared, pairs = _prepared_outputs(_gated_hardswish_block(11), samples, min_opset=13)
    ops = testing.count_ops(prepared)
    assert ops["HardSwish"] == 1 and ops["HardSigmoid"] == ops["Mul"] == 0, ops
    assert prepared.opset_import[0].version >= 14
    for before, after in pairs:
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    # At the model's own opset (calibration's preparation), the two ops stay.
    prepared, _ = _prepared_outputs(_gated_hardswish_block(11), samples, min_opset=1)
    assert testing.count_ops(prepared)["HardSigmoid"] == 1


def test_equalization_keeps_the_four_op_hardswish_fused(tmp_path):
    """Equalization prepares the model at its own opset (11 here, so HardSwish is written
    x * HardSigmoid(x)); the scheme's preparation at 14 still makes it one HardSwish."""
    samples = _samples(16)
    _path, out, _report = _quantize(
        _hardswish_block(11), tmp_path, samples, config=qconvert.QuantizeConfig(equalize=True)
    )
    ops = testing.count_ops(out)
    assert ops["HardSwish"] == 1 and ops["HardSigmoid"] == 0, ops
