"""Nearest upsampling by whole factors runs as a broadcast of the integers.

The rewrite is checked against onnxruntime's own Resize: on a DQ -> Resize -> Q graph
(the reference run unoptimized, so onnxruntime computes the float Resize its spec says)
and through `quantize` on a feature-pyramid step, where the written model must compute
the very integers the model with the Resize kept computes.
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
from qconvert.config import Format, QuantizeConfig
from qconvert.passes import ResizeOnIntegersPass
from qconvert.runtime import make_session

CHAIN = ["Transpose", "Unsqueeze", "Expand", "Shape", "Mul", "Reshape", "Transpose"]


def _qdq_resize(
    scales,
    *,
    mode: str = "nearest",
    coordinate_mode: str = "asymmetric",
    nearest_mode: str = "floor",
    q_zero_point: int = 10,
    opset: int = 17,
) -> onnx.ModelProto:
    """x (uint8, [1, 3, H, W]) -> DequantizeLinear -> Resize -> QuantizeLinear -> y."""
    attributes = {"mode": mode, "coordinate_transformation_mode": coordinate_mode}
    if mode == "nearest":
        attributes["nearest_mode"] = nearest_mode
    graph = h.make_graph(
        [
            h.make_node("DequantizeLinear", ["x", "s", "z"], ["d"]),
            h.make_node("Resize", ["d", "roi", "scales"], ["r"], **attributes),
            h.make_node("QuantizeLinear", ["r", "s", "zq"], ["y"]),
        ],
        "qdq_resize",
        [h.make_tensor_value_info("x", TensorProto.UINT8, [1, 3, "H", "W"])],
        [h.make_tensor_value_info("y", TensorProto.UINT8, ["N2", "C2", "H2", "W2"])],
        [
            nh.from_array(np.array(0.1, np.float32), "s"),
            nh.from_array(np.array(10, np.uint8), "z"),
            nh.from_array(np.array(q_zero_point, np.uint8), "zq"),
            nh.from_array(np.zeros(0, np.float32), "roi"),
            nh.from_array(np.asarray(scales, np.float32), "scales"),
        ],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _rewritten(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    graph = ir.serde.deserialize_model(model)
    modified = ResizeOnIntegersPass()(graph).modified
    proto = ir.serde.serialize_model(graph)
    onnx.checker.check_model(proto, full_check=True)
    return proto, modified


def _inputs(seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"x": rng.integers(0, 256, (1, 3, height, width), dtype=np.uint8)}
        for height, width in ((5, 7), (4, 6), (1, 1))
    ]


@pytest.mark.parametrize(
    ("coordinate_mode", "nearest_mode"),
    [
        ("asymmetric", "floor"),
        ("half_pixel", "round_prefer_floor"),
        ("half_pixel", "round_prefer_ceil"),
        ("pytorch_half_pixel", "round_prefer_floor"),
        ("pytorch_half_pixel", "round_prefer_ceil"),
    ],
)
@pytest.mark.parametrize("factors", [(2, 2), (3, 2), (1, 4), (8, 8)])
def test_whole_factor_upsampling_repeats_the_integers(coordinate_mode, nearest_mode, factors):
    model = _qdq_resize(
        [1, 1, *factors], coordinate_mode=coordinate_mode, nearest_mode=nearest_mode
    )
    rewritten, modified = _rewritten(model)
    assert modified
    assert [node.op_type for node in rewritten.graph.node] == CHAIN
    reference = make_session(model.SerializeToString(), optimize=False)
    ours = make_session(rewritten.SerializeToString())
    for feeds in _inputs(seed=sum(factors)):
        expected = reference.run(None, feeds)[0]
        assert expected.shape[2:] == (
            feeds["x"].shape[2] * factors[0],
            feeds["x"].shape[3] * factors[1],
        )
        np.testing.assert_array_equal(ours.run(None, feeds)[0], expected)


def test_opset_12_writes_unsqueeze_axes_as_an_attribute():
    rewritten, modified = _rewritten(_qdq_resize([1, 1, 2, 2], opset=12))
    assert modified
    unsqueeze = next(n for n in rewritten.graph.node if n.op_type == "Unsqueeze")
    assert [list(a.ints) for a in unsqueeze.attribute if a.name == "axes"] == [[2, 4]]
    reference = make_session(_qdq_resize([1, 1, 2, 2], opset=12).SerializeToString())
    ours = make_session(rewritten.SerializeToString())
    for feeds in _inputs(seed=1):
        np.testing.assert_array_equal(ours.run(None, feeds)[0], reference.run(None, feeds)[0])


@pytest.mark.parametrize(
    ("scales", "options"),
    [
        ([1, 1, 2, 2], {"mode": "linear"}),
        ([1, 1, 4, 4], {"nearest_mode": "round_prefer_floor"}),  # asymmetric: i/4 rounds up
        ([1, 1, 2, 2], {"coordinate_mode": "half_pixel", "nearest_mode": "floor"}),
        ([1, 1, 2, 2], {"coordinate_mode": "align_corners", "nearest_mode": "floor"}),
        ([1, 1, 1.5, 1.5], {}),
        ([1, 1, 0.5, 0.5], {}),
        ([1, 2, 2, 2], {}),
        ([1, 1, 1, 1], {}),
        ([1, 1, 2, 2], {"q_zero_point": 11}),  # the Q writes other integers
    ],
)
def test_other_resizes_are_left_as_they_are(scales, options):
    rewritten, modified = _rewritten(_qdq_resize(scales, **options))
    assert not modified
    assert [node.op_type for node in rewritten.graph.node] == [
        "DequantizeLinear",
        "Resize",
        "QuantizeLinear",
    ]


def test_left_out_mapping_is_not_a_repeat():
    # Why asymmetric + round_prefer_floor at 4x is left out: output 3 reads input 1.
    model = _qdq_resize([1, 1, 4, 4], nearest_mode="round_prefer_floor")
    x = np.arange(1 * 3 * 2 * 2, dtype=np.uint8).reshape(1, 3, 2, 2)
    resized = make_session(model.SerializeToString(), optimize=False).run(None, {"x": x})[0]
    repeated = np.repeat(np.repeat(x, 4, axis=2), 4, axis=3)
    assert not np.array_equal(resized, repeated)


def _pyramid_inputs(seed: int, count: int, side: int = 16) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"input": rng.standard_normal((1, 3, side, side)).astype(np.float32)}
        for _ in range(count)
    ]


@pytest.mark.parametrize("quantize_format", [Format.QDQ, Format.QOP])
def test_quantized_pyramid_step_upsamples_the_integers(tmp_path, monkeypatch, quantize_format):
    model = testing.save(testing.upsample_add(factor=2), tmp_path / "model.onnx")
    data = testing.write_samples(tmp_path / "calib", _pyramid_inputs(seed=0, count=8))
    config = QuantizeConfig(format=quantize_format)
    out = tmp_path / "q.onnx"
    report = qconvert.quantize(model, out, data=data, config=config, recipe="fast")
    written = testing.count_ops(out)
    assert written["Resize"] == 0
    assert written["Expand"] == 1
    assert not report.conversion.fusion_audit.unplanned
    # The same model with DQ -> Resize -> Q computes the same integers.
    monkeypatch.setattr(
        ResizeOnIntegersPass, "call", lambda self, m: ir.passes.PassResult(m, modified=False)
    )
    reference = tmp_path / "reference.onnx"
    qconvert.quantize(model, reference, data=data, config=config, recipe="fast")
    assert testing.count_ops(reference)["Resize"] == 1
    sessions = [make_session(str(path)) for path in (out, reference)]
    for side in (16, 24):
        for feeds in _pyramid_inputs(seed=1, count=2, side=side):
            ours, theirs = (s.run(None, feeds)[0] for s in sessions)
            np.testing.assert_array_equal(ours, theirs)
    if quantize_format is Format.QDQ:
        # onnxruntime's layout pass cancels the chain's two Transposes against its own
        # around the NHWC integer kernels: no more Transposes run than with the Resize.
        (tmp_path / "ours").mkdir()
        (tmp_path / "kept").mkdir()
        ran = testing.optimized_ops(out, tmp_path / "ours")
        kept = testing.optimized_ops(reference, tmp_path / "kept")
        assert ran["Resize"] == 0 and kept["Resize"] == 1
        assert ran["Transpose"] <= kept["Transpose"]
