"""Pad: folded into the Conv/AveragePool/MaxPool that reads it, else run on the integers.

The folds are checked on the float model (the folded graph must compute the very same
numbers), then through `quantize`: no Pad is left between a DequantizeLinear and a
QuantizeLinear, and a Pad that cannot fold pads the integers with Q(value).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

import qconvert
from qconvert import testing
from qconvert.fusion_audit import audit_model
from qconvert.passes import FoldPadIntoReaderPass, PadOnIntegersPass
from qconvert.runtime import make_session

C = 8


def _model(nodes, inits, *, out_shape=None, opset: int = 17) -> onnx.ModelProto:
    graph = h.make_graph(
        nodes,
        "pads",
        [h.make_tensor_value_info("input", TensorProto.FLOAT, [1, C, 12, 12])],
        [h.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)],
        [nh.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _pads(begin: tuple[int, int], end: tuple[int, int]) -> np.ndarray:
    return np.array([0, 0, *begin, 0, 0, *end], np.int64)


def _conv_inits(rng, cin: int = C, cout: int = C, k: int = 3) -> dict[str, np.ndarray]:
    return {
        "w": (rng.standard_normal((cout, cin, k, k)) * 0.3).astype(np.float32),
        "b": (rng.standard_normal(cout) * 0.1).astype(np.float32),
    }


def _fold(model: onnx.ModelProto) -> onnx.ModelProto:
    folded = ir.serde.deserialize_model(model)
    FoldPadIntoReaderPass()(folded)
    return ir.serde.serialize_model(folded)


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return make_session(model.SerializeToString()).run(None, feeds)[0]


def _inputs(seed: int = 0, count: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"input": rng.standard_normal((1, C, 12, 12)).astype(np.float32)} for _ in range(count)
    ]


def _assert_identical(model: onnx.ModelProto, folded: onnx.ModelProto) -> None:
    for feeds in _inputs(count=3):
        np.testing.assert_array_equal(_run(folded, feeds), _run(model, feeds))


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def _attribute(model: onnx.ModelProto, op_type: str, name: str):
    node = next(n for n in model.graph.node if n.op_type == op_type)
    return next((h.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def test_zero_pad_folds_into_conv_with_identical_outputs():
    rng = np.random.default_rng(1)
    # TensorFlow's "same" padding for a 3x3 stride-2 Conv: one zero row/column at the end,
    # added to the Conv's own one-pixel padding.
    model = _model(
        [
            h.make_node("Pad", ["input", "pads"], ["padded"], name="pad"),
            h.make_node(
                "Conv",
                ["padded", "w", "b"],
                ["output"],
                name="conv",
                strides=[2, 2],
                pads=[1, 1, 1, 1],
            ),
        ],
        {"pads": _pads((0, 0), (1, 1)), **_conv_inits(rng)},
        out_shape=[1, C, 7, 7],
    )
    folded = _fold(model)
    assert _ops(folded) == ["Conv"]
    assert _attribute(folded, "Conv", "pads") == [1, 1, 2, 2]
    _assert_identical(model, folded)


def test_zero_pad_folds_into_average_pool_counting_the_padding():
    # The Pad's zeros are averaged in; the pool's own padding is, once count_include_pad=1.
    model = _model(
        [
            h.make_node("Pad", ["input", "pads"], ["padded"], name="pad"),
            h.make_node(
                "AveragePool", ["padded"], ["output"], name="pool", kernel_shape=[3, 3]
            ),
        ],
        {"pads": _pads((1, 1), (1, 1))},
        out_shape=[1, C, 12, 12],
    )
    folded = _fold(model)
    assert _ops(folded) == ["AveragePool"]
    assert _attribute(folded, "AveragePool", "count_include_pad") == 1
    _assert_identical(model, folded)


def test_zero_pad_folds_into_max_pool_after_relu():
    # Relu's output is never negative, so a padded zero never wins a max it would not
    # have won anyway.
    model = _model(
        [
            h.make_node("Relu", ["input"], ["relu"], name="relu"),
            h.make_node("Pad", ["relu", "pads"], ["padded"], name="pad"),
            h.make_node(
                "MaxPool",
                ["padded"],
                ["output"],
                name="pool",
                kernel_shape=[3, 3],
                strides=[2, 2],
            ),
        ],
        {"pads": _pads((1, 1), (0, 0))},
        out_shape=[1, C, 6, 6],
    )
    folded = _fold(model)
    assert _ops(folded) == ["Relu", "MaxPool"]
    _assert_identical(model, folded)


@pytest.mark.parametrize(
    ("reader", "why"),
    [
        ("MaxPool", "signed input: a padded zero can win the max"),
        ("ConvTranspose", "its pads crop the output; input padding would need negative pads"),
    ],
)
def test_pad_that_would_change_the_result_is_not_folded(reader, why):
    rng = np.random.default_rng(2)
    if reader == "MaxPool":
        node = h.make_node("MaxPool", ["padded"], ["output"], name="r", kernel_shape=[3, 3])
        inits, shape = {}, [1, C, 12, 12]
    else:
        node = h.make_node("ConvTranspose", ["padded", "w", "b"], ["output"], name="r")
        inits, shape = _conv_inits(rng), [1, C, 16, 16]
    model = _model(
        [h.make_node("Pad", ["input", "pads"], ["padded"], name="pad"), node],
        {"pads": _pads((1, 1), (1, 1)), **inits},
        out_shape=shape,
    )
    folded = _fold(model)
    assert _ops(folded) == ["Pad", reader], why
    _assert_identical(model, folded)


def test_pad_read_by_a_conv_and_another_op_folds_for_the_conv_only():
    rng = np.random.default_rng(3)
    model = _model(
        [
            h.make_node("Pad", ["input", "pads"], ["padded"], name="pad"),
            h.make_node("Conv", ["padded", "w", "b"], ["conv"], name="conv"),
            h.make_node("Slice", ["padded", "st", "en", "ax"], ["sliced"], name="slice"),
            h.make_node("Add", ["conv", "sliced"], ["output"], name="add"),
        ],
        {
            "pads": _pads((1, 1), (1, 1)),
            "st": np.array([1, 1], np.int64),
            "en": np.array([13, 13], np.int64),
            "ax": np.array([2, 3], np.int64),
            **_conv_inits(rng),
        },
        out_shape=[1, C, 12, 12],
    )
    folded = _fold(model)
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    assert conv.input[0] == "input"
    assert _ops(folded).count("Pad") == 1
    _assert_identical(model, folded)


def _padded_chain(mode: str = "constant", value: float | None = None) -> onnx.ModelProto:
    """Conv -> Relu -> Pad (pads no Conv can take) -> Conv: the Pad cannot fold."""
    rng = np.random.default_rng(4)
    first = _conv_inits(rng)
    second = _conv_inits(rng)
    pad_inputs = ["relu", "pads"] + (["value"] if value is not None else [])
    inits = {
        "w1": first["w"],
        "b1": first["b"],
        "w2": second["w"],
        "b2": second["b"],
        "pads": _pads((2, 2), (2, 2)),
    }
    if value is not None:
        inits["value"] = np.array(value, np.float32)
    return _model(
        [
            h.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
            h.make_node("Relu", ["c1"], ["relu"], name="relu"),
            h.make_node("Pad", pad_inputs, ["padded"], name="pad", mode=mode),
            # Reflect padding, or a non-zero value, is no Conv's own padding.
            h.make_node("Conv", ["padded", "w2", "b2"], ["output"], name="conv2"),
        ],
        inits,
        out_shape=[1, C, 14, 14],
    )


@pytest.mark.parametrize(
    ("mode", "value"), [("reflect", None), ("constant", 0.7), ("constant", -3.0)]
)
def test_unfoldable_pad_runs_on_the_integers(tmp_path, monkeypatch, mode, value):
    model = testing.save(_padded_chain(mode, value), tmp_path / "model.onnx")
    data = testing.write_samples(tmp_path / "calib", _inputs(seed=5, count=8))
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(model, out, data=data)
    written = onnx.load(out)
    pad = next(n for n in written.graph.node if n.op_type == "Pad")
    producer = next(n for n in written.graph.node if pad.input[0] in n.output)
    assert producer.op_type == "QuantizeLinear"  # the Pad reads the integers
    assert not report.conversion.fusion_audit.islands
    # The same model with DQ -> Pad -> Q computes the same integers.
    monkeypatch.setattr(
        PadOnIntegersPass, "call", lambda self, m: ir.passes.PassResult(m, modified=False)
    )
    reference = tmp_path / "reference.onnx"
    kept = qconvert.quantize(model, reference, data=data)
    assert audit_model(str(reference)).islands_by_op() == {"Pad": 1}
    assert kept.conversion.fusion_audit.unplanned
    sessions = [make_session(str(path)) for path in (out, reference)]
    for feeds in _inputs(seed=6, count=3):
        ours, theirs = (s.run(None, feeds)[0] for s in sessions)
        np.testing.assert_array_equal(ours, theirs)


def test_pad_value_becomes_its_quantized_level():
    # Q(0.7) at scale 0.1, zero point 10: round(7) + 10 = 17; Q(-3) clips at 0.
    for value, level in ((0.7, 17), (-3.0, 0), (0.0, 10)):
        text = f"""
            <ir_version: 8, opset_import: ["" : 17]>
            g (uint8[1,1,2,2] x) => (uint8[1,1,4,4] y) {{
                s = Constant <value = float {{0.1}}> ()
                z = Constant <value = uint8 {{10}}> ()
                pads = Constant <value = int64[8] {{0,0,1,1,0,0,1,1}}> ()
                v = Constant <value = float {{{value}}}> ()
                d = DequantizeLinear (x, s, z)
                p = Pad (d, pads, v)
                y = QuantizeLinear (p, s, z)
            }}
        """
        model = ir.serde.deserialize_model(onnx.parser.parse_model(text))
        from onnx_ir.passes.common import LiftConstantsToInitializersPass

        LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        assert PadOnIntegersPass()(model).modified
        proto = ir.serde.serialize_model(model)
        assert _ops(proto) == ["Pad"]
        x = np.array([[[[20, 30], [40, 50]]]], np.uint8)
        y = make_session(proto.SerializeToString()).run(None, {"x": x})[0]
        assert y[0, 0, 0, 0] == level
        np.testing.assert_array_equal(y[0, 0, 1:3, 1:3], x[0, 0])


def test_tf_style_padded_cnn_quantizes_without_a_pad(tmp_path):
    from bench.builders import efficientnet_lite_style

    model = testing.save(efficientnet_lite_style(size=32), tmp_path / "model.onnx")
    data = testing.write_samples(
        tmp_path / "calib",
        [
            {
                "input": np.random.default_rng(i)
                .standard_normal((1, 3, 32, 32))
                .astype(np.float32)
            }
            for i in range(4)
        ],
    )
    report = qconvert.quantize(model, tmp_path / "q.onnx", data=data)
    audit = report.conversion.fusion_audit
    assert testing.count_ops(tmp_path / "q.onnx")["Pad"] == 0
    assert audit.islands == ()
    # 50 Convs: the stem (3x3 on the 3-channel input) computes in float, the head
    # writes the graph output (test_float_stem_conv).
    assert audit.integer_kernels["QLinearConv"] == 48


def test_minus_infinity_pad_folds_into_max_pool_on_signed_data():
    # -inf never wins a max: the pool's own padding is exactly that.
    model = _model(
        [
            h.make_node("Pad", ["input", "pads", "value"], ["padded"], name="pad"),
            h.make_node("MaxPool", ["padded"], ["output"], name="pool", kernel_shape=[3, 3]),
        ],
        {"pads": _pads((1, 2), (2, 1)), "value": np.array(-np.inf, np.float32)},
        out_shape=[1, C, 13, 13],
    )
    folded = _fold(model)
    assert _ops(folded) == ["MaxPool"]
    assert _attribute(folded, "MaxPool", "pads") == [1, 2, 2, 1]
    _assert_identical(model, folded)
