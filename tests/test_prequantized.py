"""Pre-quantized (QDQ) models: finished, not quantized again; fake quantization refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import qconvert
from qconvert import testing
from qconvert.config import Format, QuantizeConfig
from qconvert.errors import VerificationError
from qconvert.pipelines.prequantized import check_same_function
from qconvert.runtime import make_session

SAMPLES = Path(__file__).parent.parent / "sample_models" / "digits_qat"


def _init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _graph_model(nodes, inputs, outputs, initializers, *, opset=13, microsoft=False):
    opsets = [helper.make_opsetid("", opset)]
    if microsoft:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10 if opset >= 21 else 8
    onnx.checker.check_model(model)
    return model


def _x(shape=(2, 4)):
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))


def _y(name="y", dtype=TensorProto.FLOAT, shape=(2, 6)):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def _activation_pair(name: str, scale: float, domain: str = "") -> list[onnx.NodeProto]:
    """x -> Q -> DQ -> `{name}_dq`, with initializers `act_scale`/`act_zp`."""
    return [
        helper.make_node("QuantizeLinear", ["x", "act_scale", "act_zp"], [f"{name}_q"],
                         name=f"{name}_Q", domain=domain),
        helper.make_node("DequantizeLinear", [f"{name}_q", "act_scale", "act_zp"],
                         [f"{name}_dq"], name=f"{name}_DQ", domain=domain),
    ]  # fmt: skip


def _weight_pair(weight, prefix, scale, zero, *, domain="", **attributes):
    nodes = [
        helper.make_node("QuantizeLinear", [weight, f"{prefix}_s", f"{prefix}_z"],
                         [f"{prefix}_q"], name=f"{prefix}_Q", domain=domain, **attributes),
        helper.make_node("DequantizeLinear", [f"{prefix}_q", f"{prefix}_s", f"{prefix}_z"],
                         [f"{prefix}_dq"], name=f"{prefix}_DQ", domain=domain, **attributes),
    ]  # fmt: skip
    return nodes, [_init(f"{prefix}_s", scale), _init(f"{prefix}_z", zero)]


RNG = np.random.default_rng(0)
W = (RNG.standard_normal((4, 6)) * 0.5).astype(np.float32)

GRANULARITIES = {
    "per tensor": (13, np.float32(0.01), np.int8(0), {}),
    "per channel, axis 1": (
        13,
        (np.abs(W).max(0) / 127).astype(np.float32),
        np.zeros(6, np.int8),
        {"axis": 1},
    ),
    "blocked, axis 0, block 2": (
        21,
        (np.abs(W).reshape(2, 2, 6).max(1) / 127).astype(np.float32),
        np.zeros((2, 6), np.int8),
        {"axis": 0, "block_size": 2},
    ),
}


def _matmul_model(granularity: str, *, domain: str = "") -> onnx.ModelProto:
    """DQ(x) x DQ(Q(W)); a blocked weight is read by a float x (weight-only quantization).

    onnxruntime 1.32 fuses a blocked int8 DQ weight and a DQ activation into
    MatMulIntegerToFloat, which then fails to run; verification catches that (exit 4).
    """
    opset, scale, zero, attributes = GRANULARITIES[granularity]
    weight_nodes, weight_inits = _weight_pair(
        "W", "w", scale, zero, domain=domain, **attributes
    )
    activation = _activation_pair("x", 0.02, domain)
    if "block_size" in attributes:
        activation = [helper.make_node("Relu", ["x"], ["x_dq"], name="relu")]
    nodes = [
        *activation,
        *weight_nodes,
        helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], name="mm"),
    ]
    inits = [
        _init("W", W),
        _init("act_scale", np.float32(0.02)),
        _init("act_zp", np.uint8(128)),
    ]
    return _graph_model(
        nodes, [_x()], [_y()], inits + weight_inits, opset=opset, microsoft=bool(domain)
    )


def _finish(model: onnx.ModelProto, tmp_path: Path, *options: str, **kwargs):
    source = testing.save(model, tmp_path / "pre.onnx")
    out = tmp_path / "out.onnx"
    report = qconvert.quantize(source, out, **kwargs)
    return source, out, report


def _outputs(path, feeds):
    return make_session(str(path)).run(None, feeds)


def _feeds(shape=(2, 4), seed=1):
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def _initializer_types(path) -> dict[str, int]:
    model = onnx.load(str(path))
    return {t.name: t.data_type for t in model.graph.initializer}


@pytest.mark.parametrize("granularity", list(GRANULARITIES))
def test_weight_pair_is_stored_as_integers(tmp_path, granularity):
    source, out, report = _finish(_matmul_model(granularity), tmp_path)
    ops = testing.count_ops(out)
    activation = "block_size" not in GRANULARITIES[granularity][3]
    assert (
        ops["QuantizeLinear"] == activation
    )  # an activation's pair stays; the weight's Q goes
    assert ops["DequantizeLinear"] == 1 + activation
    types = _initializer_types(out)
    assert "W" not in types
    assert types["W_q"] == TensorProto.INT8
    feeds = _feeds()
    np.testing.assert_array_equal(_outputs(out, feeds)[0], _outputs(source, feeds)[0])
    assert report.conversion.finished == (
        f"weight 'W' stored as int8 ({granularity}), read through DequantizeLinear 'w_DQ'",
    )
    kept = ("MatMul 'mm' computes in float: its input has no trained range (pass --data "
            "to fill it in)",)  # fmt: skip
    assert report.conversion.kept == (() if activation else kept)
    assert report.size_ratio < 1


def test_int4_blocked_weight_is_stored_as_int4(tmp_path):
    weight = (np.random.default_rng(2).standard_normal((8, 6)) * 0.5).astype(np.float32)
    scale = (np.abs(weight).reshape(2, 4, 6).max(1) / 7).astype(np.float32)
    blocked = {"axis": 0, "block_size": 4}
    nodes = [
        helper.make_node("QuantizeLinear", ["W", "s", "z"], ["wq"], name="w_Q", **blocked),
        helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"], name="w_DQ", **blocked),
        helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm"),
    ]
    inits = [
        _init("W", weight),
        _init("s", scale),
        helper.make_tensor("z", TensorProto.INT4, [2, 6], [0] * 12),
    ]
    model = _graph_model(nodes, [_x((2, 8))], [_y()], inits, opset=21)
    source, out, report = _finish(model, tmp_path)
    assert _initializer_types(out)["W_q"] == TensorProto.INT4
    assert report.conversion.finished == (
        "weight 'W' stored as int4 (blocked, axis 0, block 4), read through DequantizeLinear "
        "'w_DQ'",
    )
    feeds = _feeds((2, 8))
    np.testing.assert_array_equal(_outputs(out, feeds)[0], _outputs(source, feeds)[0])
    assert report.size_ratio < 0.6


def test_microsoft_domain_pairs_are_recognised(tmp_path):
    source, out, _ = _finish(_matmul_model("per tensor", domain="com.microsoft"), tmp_path)
    model = onnx.load(str(out))
    domains = {(n.op_type, n.domain) for n in model.graph.node}
    assert ("DequantizeLinear", "com.microsoft") in domains
    assert testing.count_ops(out)["QuantizeLinear"] == 1
    feeds = _feeds()
    np.testing.assert_array_equal(_outputs(out, feeds)[0], _outputs(source, feeds)[0])


def test_microsoft_domain_pairs_become_integer_operators_in_qop(tmp_path):
    config = QuantizeConfig(format=Format.QOP)
    model = _matmul_model("per channel, axis 1", domain="com.microsoft")
    source, out, report = _finish(model, tmp_path, config=config)
    ops = testing.count_ops(out)
    assert ops["MatMulInteger"] == 1 and "MatMul" not in ops
    assert testing.optimized_ops(out, tmp_path)["MatMulInteger"] == 1
    feeds = _feeds()
    np.testing.assert_allclose(_outputs(out, feeds)[0], _outputs(source, feeds)[0], atol=1e-5)
    assert report.conversion.finished[-1] == (
        "3 com.microsoft QuantizeLinear/DequantizeLinear of 8-bit types written as the "
        "equal ai.onnx ops, which integer operators read"
    )


def test_shared_weight_gets_integers_per_quantizer(tmp_path):
    first, first_inits = _weight_pair("W", "a", np.float32(0.01), np.int8(0))
    second, second_inits = _weight_pair("W", "b", np.float32(0.03), np.int8(0))
    nodes = [
        *_activation_pair("x", 0.02),
        *first,
        *second,
        helper.make_node("MatMul", ["x_dq", "a_dq"], ["y"], name="mm1"),
        helper.make_node("MatMul", ["x_dq", "b_dq"], ["z"], name="mm2"),
    ]
    inits = [
        _init("W", W),
        _init("act_scale", np.float32(0.02)),
        _init("act_zp", np.uint8(128)),
    ]
    model = _graph_model(nodes, [_x()], [_y(), _y("z")], inits + first_inits + second_inits)
    source, out, report = _finish(model, tmp_path)
    types = _initializer_types(out)
    assert "W" not in types
    assert types["W_q"] == types["W_q_1"] == TensorProto.INT8
    feeds = _feeds()
    for got, expected in zip(_outputs(out, feeds), _outputs(source, feeds), strict=True):
        np.testing.assert_array_equal(got, expected)
    assert len(report.conversion.finished) == 2


def test_pair_feeding_two_consumers_keeps_one_dequantizer(tmp_path):
    weight, weight_inits = _weight_pair("W", "w", np.float32(0.01), np.int8(0))
    nodes = [
        *_activation_pair("x", 0.02),
        *weight,
        helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], name="mm1"),
        helper.make_node("MatMul", ["x_dq", "w_dq"], ["h"], name="mm2"),
        helper.make_node("Relu", ["h"], ["z"], name="relu"),
    ]
    inits = [
        _init("W", W),
        _init("act_scale", np.float32(0.02)),
        _init("act_zp", np.uint8(128)),
    ]
    model = _graph_model(nodes, [_x()], [_y(), _y("z")], inits + weight_inits)
    source, out, report = _finish(model, tmp_path)
    ops = testing.count_ops(out)
    assert ops["DequantizeLinear"] == 2 and ops["QuantizeLinear"] == 1
    weights = [t.name for t in onnx.load(str(out)).graph.initializer if t.dims == [4, 6]]
    assert weights == ["W_q"]
    feeds = _feeds()
    for got, expected in zip(_outputs(out, feeds), _outputs(source, feeds), strict=True):
        np.testing.assert_array_equal(got, expected)
    assert report.conversion.finished == (
        "weight 'W' stored as int8 (per tensor), read through DequantizeLinear 'w_DQ'",
    )


def test_quantize_without_dequantize_is_kept(tmp_path):
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["r"], name="sigmoid"),
        helper.make_node("QuantizeLinear", ["r", "s", "z"], ["codes"], name="lonely_Q"),
    ]
    inits = [_init("s", np.float32(0.05)), _init("z", np.uint8(0))]
    model = _graph_model(nodes, [_x()], [_y("codes", TensorProto.UINT8, (2, 4))], inits)
    source, out, report = _finish(model, tmp_path)
    assert testing.count_ops(out) == testing.count_ops(source)
    feeds = _feeds()
    np.testing.assert_array_equal(_outputs(out, feeds)[0], _outputs(source, feeds)[0])
    assert report.conversion.kept == (
        "QuantizeLinear 'lonely_Q' has no DequantizeLinear reader: left as it is",
    )
    assert report.conversion.finished == ()


def test_weight_with_a_computed_scale_is_refused_and_left_as_it_is(tmp_path):
    nodes = [
        *_activation_pair("x", 0.02),
        helper.make_node("Abs", ["w_s"], ["w_abs"], name="abs"),
        helper.make_node("QuantizeLinear", ["W", "w_abs", "w_z"], ["w_q"], name="w_Q"),
        helper.make_node("DequantizeLinear", ["w_q", "w_abs", "w_z"], ["w_dq"], name="w_DQ"),
        helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], name="mm"),
    ]
    inits = [
        _init("W", W),
        _init("w_s", np.float32(-0.01)),
        _init("w_z", np.int8(0)),
        _init("act_scale", np.float32(0.02)),
        _init("act_zp", np.uint8(128)),
    ]
    source, out, report = _finish(_graph_model(nodes, [_x()], [_y()], inits), tmp_path)
    assert testing.count_ops(out)["QuantizeLinear"] == 2
    assert report.conversion.refused == (
        "weight 'W': the scale or zero point of QuantizeLinear 'w_Q' is computed at run "
        "time, so its integers cannot be stored",
    )
    feeds = _feeds()
    np.testing.assert_array_equal(_outputs(out, feeds)[0], _outputs(source, feeds)[0])


def _conv_bn_model(*, range_between: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    weight = (rng.standard_normal((4, 2, 3, 3)) * 0.4).astype(np.float32)
    scale = (np.abs(weight).reshape(4, -1).max(1) / 127).astype(np.float32)
    pair, pair_inits = _weight_pair("W", "w", scale, np.zeros(4, np.int8), axis=0)
    nodes = [*_activation_pair("x", 0.02), *pair]
    nodes.append(helper.make_node("Conv", ["x_dq", "w_dq", "B"], ["c"], name="conv",
                                  pads=[1, 1, 1, 1]))  # fmt: skip
    bn_input = "c"
    if range_between:
        nodes += [
            helper.make_node("QuantizeLinear", ["c", "cs", "cz"], ["c_q"], name="c_Q"),
            helper.make_node("DequantizeLinear", ["c_q", "cs", "cz"], ["c_dq"], name="c_DQ"),
        ]
        bn_input = "c_dq"
    nodes += [
        helper.make_node("BatchNormalization", [bn_input, "g", "b", "m", "v"], ["n"],
                         name="bn"),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        helper.make_node("QuantizeLinear", ["r", "os", "oz"], ["r_q"], name="out_Q"),
        helper.make_node("DequantizeLinear", ["r_q", "os", "oz"], ["y"], name="out_DQ"),
    ]  # fmt: skip
    inits = [
        _init("W", weight),
        _init("B", (rng.standard_normal(4) * 0.1).astype(np.float32)),
        _init("act_scale", np.float32(0.02)),
        _init("act_zp", np.uint8(128)),
        _init("g", rng.uniform(0.5, 1.5, 4).astype(np.float32)),
        _init("b", (rng.standard_normal(4) * 0.1).astype(np.float32)),
        _init("m", (rng.standard_normal(4) * 0.1).astype(np.float32)),
        _init("v", rng.uniform(0.5, 2.0, 4).astype(np.float32)),
        _init("cs", np.float32(0.03)),
        _init("cz", np.uint8(128)),
        _init("os", np.float32(0.02)),
        _init("oz", np.uint8(0)),
        *pair_inits,
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])
    return _graph_model(nodes, [x], [_y(shape=(1, 4, 5, 5))], inits)


def test_batchnorm_folds_into_the_quantized_weight_scale(tmp_path):
    source, out, report = _finish(_conv_bn_model(range_between=False), tmp_path)
    ops = testing.count_ops(out)
    assert "BatchNormalization" not in ops and "Relu" not in ops
    assert _initializer_types(out)["W_q"] == TensorProto.INT8
    feeds = _feeds((1, 2, 5, 5))
    step = 0.02
    difference = np.abs(_outputs(out, feeds)[0] - _outputs(source, feeds)[0]).max()
    assert difference <= step * 1.0001, difference
    assert (
        "BatchNormalization 'bn' folded into 'conv': its weight keeps its integers, the "
        "scale absorbs gamma / std"
    ) in report.conversion.finished


def test_batchnorm_after_a_trained_range_stays(tmp_path):
    source, out, report = _finish(_conv_bn_model(range_between=True), tmp_path)
    assert testing.count_ops(out)["BatchNormalization"] == 1
    assert report.conversion.kept[0] == (
        "BatchNormalization 'bn' stays: its input 'c_dq' carries a trained range "
        "(QuantizeLinear 'c_Q'), which folding would invalidate"
    )
    feeds = _feeds((1, 2, 5, 5))
    difference = np.abs(_outputs(out, feeds)[0] - _outputs(source, feeds)[0]).max()
    assert difference <= 0.02 * 1.0001, difference


def test_qop_format_writes_integer_operators(tmp_path):
    source, out, report = _finish(
        _conv_bn_model(range_between=False),
        tmp_path,
        config=QuantizeConfig(format=Format.QOP),
    )
    ops = testing.count_ops(out)
    assert ops["QLinearConv"] == 1 and "Conv" not in ops
    assert testing.optimized_ops(out, tmp_path)["QLinearConv"] == 1
    feeds = _feeds((1, 2, 5, 5))
    difference = np.abs(_outputs(out, feeds)[0] - _outputs(source, feeds)[0]).max()
    assert difference <= 0.02 * 1.0001, difference
    assert report.conversion.quantized_ops == {"QLinearConv": 1}


def _partly_quantized() -> onnx.ModelProto:
    """A float first MatMul (no ranges), then a trained Q/DQ MatMul."""
    rng = np.random.default_rng(5)
    first = (rng.standard_normal((4, 8)) * 0.5).astype(np.float32)
    second = (rng.standard_normal((8, 3)) * 0.5).astype(np.float32)
    pair, pair_inits = _weight_pair("W2", "w", np.float32(0.01), np.int8(0))
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="first"),
        helper.make_node("QuantizeLinear", ["h", "hs", "hz"], ["h_q"], name="h_Q"),
        helper.make_node("DequantizeLinear", ["h_q", "hs", "hz"], ["h_dq"], name="h_DQ"),
        *pair,
        helper.make_node("MatMul", ["h_dq", "w_dq"], ["y"], name="second"),
    ]
    inits = [
        _init("W1", first),
        _init("W2", second),
        _init("hs", np.float32(0.03)),
        _init("hz", np.uint8(128)),
        *pair_inits,
    ]
    return _graph_model(nodes, [_x()], [_y(shape=(2, 3))], inits)


def test_data_fills_in_only_the_ranges_the_model_lacks(tmp_path):
    samples = [_feeds(seed=seed) for seed in range(8)]
    testing.write_samples(tmp_path / "calib", samples)
    source, out, report = _finish(_partly_quantized(), tmp_path, data=tmp_path / "calib")
    model = onnx.load(str(out))
    initial = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert initial["hs"] == np.float32(0.03) and initial["hz"] == np.uint8(128)
    assert initial["W1_q"].dtype == np.int8 and initial["W2_q"].dtype == np.int8
    finished = report.conversion.finished
    low = min(float(s["x"].min()) for s in samples)
    high = max(float(s["x"].max()) for s in samples)
    assert finished[1] == (
        f"activation 'x' had no trained range: quantized to uint8 with the range measured "
        f"on the data [{low:.4g}, {high:.4g}]"
    )
    assert finished[2] == (
        "weight 'W1' of 'first' had no trained range: stored as int8, symmetric per channel"
    )
    assert report.conversion.calibration_samples == 8
    assert testing.output_sqnr(source, out, samples) > 30


def test_report_json_lists_finished_kept_refused(tmp_path):
    report_path = tmp_path / "report.json"
    _finish(_partly_quantized(), tmp_path, report=report_path)
    conversion = json.loads(report_path.read_text())["conversion"]
    assert conversion["finished"] == [
        "weight 'W2' stored as int8 (per tensor), read through DequantizeLinear 'w_DQ'"
    ]
    assert conversion["kept"] == [
        "MatMul 'first' computes in float: its input has no trained range (pass --data to "
        "fill it in)"
    ]
    assert conversion["refused"] == []


# --- refusals ------------------------------------------------------------------------


def _fake_quant_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Div", ["x", "s"], ["scaled"], name="div"),
        helper.make_node("Round", ["scaled"], ["rounded"], name="round"),
        helper.make_node("Clip", ["rounded", "lo", "hi"], ["clipped"], name="clip"),
        helper.make_node("Mul", ["clipped", "s"], ["fq"], name="mul"),
        helper.make_node("MatMul", ["fq", "W"], ["y"], name="mm"),
    ]
    inits = [
        _init("s", np.float32(0.02)),
        _init("lo", np.float32(-128)),
        _init("hi", np.float32(127)),
        _init("W", W),
    ]
    return _graph_model(nodes, [_x()], [_y()], inits)


def _refused(run_cli, model, tmp_path, *options):
    path = testing.save(model, tmp_path / "m.onnx")
    before = path.read_bytes()
    out = tmp_path / "out.onnx"
    result = run_cli("quantize", path, "-o", out, *options)
    assert not out.exists()
    assert path.read_bytes() == before
    assert "Traceback" not in result.err
    return path, result


def test_fake_quantization_in_float_ops_is_refused(run_cli, tmp_path):
    path, result = _refused(run_cli, _fake_quant_model(), tmp_path)
    assert result.code == 3
    assert result.err.strip().splitlines()[0] == (
        f"Error: Model '{path}' spells out fake quantization in float ops (Div 'div' -> "
        "Round 'round' -> Clip 'clip' -> Mul 'mul'); qconvert reads trained ranges only "
        "from QuantizeLinear/DequantizeLinear pairs. Hint: export the model with "
        "QuantizeLinear/DequantizeLinear nodes (the ONNX export of a FakeQuantize model "
        "writes them), or start from the float model."
    )


def test_clip_round_mul_chain_is_refused(run_cli, tmp_path):
    nodes = [
        helper.make_node("Clip", ["x", "lo", "hi"], ["clipped"], name="clip"),
        helper.make_node("Round", ["clipped"], ["rounded"], name="round"),
        helper.make_node("Mul", ["rounded", "s"], ["y"], name="mul"),
    ]
    inits = [
        _init("s", np.float32(0.02)),
        _init("lo", np.float32(0)),
        _init("hi", np.float32(255)),
    ]
    path, result = _refused(
        run_cli, _graph_model(nodes, [_x()], [_y(shape=(2, 4))], inits), tmp_path
    )
    assert result.code == 3
    assert (
        result.err.strip()
        .splitlines()[0]
        .startswith(
            f"Error: Model '{path}' spells out fake quantization in float ops (Clip 'clip' -> "
            "Round 'round' -> Mul 'mul'); "
        )
    )


def test_outputs_more_than_one_step_apart_fail_verification(tmp_path):
    def model(shift: float) -> onnx.ModelProto:
        nodes = [
            helper.make_node("Add", ["x", "shift"], ["shifted"], name="add"),
            helper.make_node("QuantizeLinear", ["shifted", "s", "z"], ["q"], name="Q"),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="DQ"),
        ]
        inits = [_init("shift", np.float32(shift)), _init("s", np.float32(0.02))]
        inits.append(_init("z", np.uint8(128)))
        return _graph_model(nodes, [_x()], [_y(shape=(2, 4))], inits)

    original = testing.save(model(0.0), tmp_path / "a.onnx")
    shifted = model(0.06)
    finished = ir.serde.deserialize_model(shifted)
    feeds = [{"x": np.zeros((2, 4), np.float32)}]
    with pytest.raises(VerificationError) as caught:
        check_same_function(str(original), shifted.SerializeToString(), finished, feeds)
    assert str(caught.value) == (
        "The finished model's output 'y' differs from the pre-quantized model's by 0.06 on "
        "check sample 0, more than one quantization step (0.02)."
    )
    assert caught.value.exit_code == 4
    check_same_function(str(original), original.read_bytes(), finished, feeds)


def test_integer_operators_are_refused(run_cli, tmp_path):
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["x_q"], name="q"),
        helper.make_node("QLinearMatMul", ["x_q", "s", "z", "Wq", "ws", "wz", "s", "z"],
                         ["y_q"], name="qmm"),
        helper.make_node("DequantizeLinear", ["y_q", "s", "z"], ["y"], name="dq"),
    ]  # fmt: skip
    inits = [
        _init("s", np.float32(0.02)),
        _init("z", np.uint8(128)),
        _init("Wq", np.ones((4, 6), np.int8)),
        _init("ws", np.float32(0.01)),
        _init("wz", np.int8(0)),
    ]
    path, result = _refused(run_cli, _graph_model(nodes, [_x()], [_y()], inits), tmp_path)
    assert result.code == 3
    assert result.err.strip().splitlines()[0] == (
        f"Error: Model '{path}' is already quantized (it holds QLinearMatMul node 'qmm'); "
        "qconvert finishes QuantizeLinear/DequantizeLinear models but does not convert "
        "integer operators again. Hint: start from the float model or its QDQ form."
    )


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        (("--scheme", "16x8", "--data", "calib"), None),
        (("--method", "entropy"), "--method"),
        (("--adaround", "--data", "calib"), "--adaround"),
        (("--per-layer", "--eval", "calib"), "--per-layer"),
    ],
)
def test_options_that_change_trained_ranges_are_refused(run_cli, tmp_path, options, flag):
    testing.write_samples(tmp_path / "calib", [_feeds()])
    options = tuple(str(tmp_path / o) if o == "calib" else o for o in options)
    _, result = _refused(run_cli, _matmul_model("per tensor"), tmp_path, *options)
    assert result.code == (3 if flag is None else 2)
    expected = (
        "Error: --scheme 16x8 does not apply to a pre-quantized model: its "
        "QuantizeLinear/DequantizeLinear pairs already fix the types. Hint: leave --scheme "
        "out (int8), or start from the float model."
        if flag is None
        else f"Error: {flag} does not apply to a pre-quantized model. Hint: finishing keeps "
        "the trained ranges; start from the float model to use it."
    )
    assert result.err.strip().splitlines()[0] == expected


# --- the QAT sample model ---------------------------------------------------------------


def test_qat_sample_model_is_finished(tmp_path):
    model = SAMPLES / "model.onnx"
    out = tmp_path / "qat.int8.onnx"
    report = qconvert.quantize(model, out, eval_data=SAMPLES / "eval")
    comparison = report.comparison
    assert report.size_ratio <= 0.30, report.size_ratio
    assert comparison.candidate_accuracy == comparison.reference_accuracy
    assert comparison.reference_accuracy > 0.95
    qop = tmp_path / "qat.qop.onnx"
    qconvert.quantize(model, qop, config=QuantizeConfig(format=Format.QOP))
    fused = testing.optimized_ops(qop, tmp_path)
    assert fused["QLinearConv"] == 2 and fused["QGemm"] == 2
    assert not {"Conv", "Gemm", "MatMul"} & set(fused)
    # The export itself leaves the Gemm after Flatten in float: finishing fixes that.
    assert testing.optimized_ops(model, tmp_path)["Gemm"] == 1
    assert testing.optimized_ops(out, tmp_path)["QGemm"] == 2
