"""A tensor whose readers are flat past an edge is quantized up to that edge only.

HardSwish reads every value at or below -3 as 0, HardSigmoid is flat outside
[-beta / alpha, (1 - beta) / alpha], Clip outside its bounds; increasing affine maps by
scalars between the tensor and those readers carry the edge back. The grid then reaches
the edge (and one step past it) and no further: checked on the written model's
parameters, and on its outputs against the same plan without the cut, in onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from qconvert import testing
from qconvert.calibration import TensorRange
from qconvert.plan import flat_ranges

CHANNELS, WIDE, SIZE = 16, 8, 8


def _model(between: list[tuple[str, float]], reader: str, residual: bool = False):
    """x -> Conv 3x3 (WIDE) -> [scalar affine ops] -> reader -> Conv 1x1 -> y.

    The first Conv's output spans about [-40, 40]; `residual` also adds it to the
    reader's output, a reader that is not flat anywhere.
    """
    rng = np.random.default_rng(3)
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv1", pads=[1] * 4)]
    inits = {
        "w1": rng.standard_normal((WIDE, CHANNELS, 3, 3)),
        "b1": rng.standard_normal(WIDE),
        "w2": rng.standard_normal((8, WIDE, 1, 1)) * 0.3,
        "b2": rng.standard_normal(8) * 0.1,
    }
    source = "c"
    for index, (op, constant) in enumerate(between):
        name = f"k{index}"
        inits[name] = np.array([constant])
        nodes.append(h.make_node(op, [source, name], [f"a{index}"], name=f"affine{index}"))
        source = f"a{index}"
    if reader == "Clip":
        inits["lo"], inits["hi"] = np.array(-1.0), np.array(4.0)
        nodes.append(h.make_node("Clip", [source, "lo", "hi"], ["r"], name="act"))
    elif reader == "HardSigmoid":
        nodes.append(h.make_node("HardSigmoid", [source], ["r"], name="act", alpha=0.25))
    else:
        nodes.append(h.make_node(reader, [source], ["r"], name="act"))
    if residual:
        nodes.append(h.make_node("Add", ["r", source], ["rr"], name="residual"))
    nodes.append(
        h.make_node("Conv", ["rr" if residual else "r", "w2", "b2"], ["y"], name="conv2")
    )
    graph = h.make_graph(
        nodes,
        "flat",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, CHANNELS, SIZE, SIZE])],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, SIZE, SIZE])],
        [nh.from_array(np.asarray(a, np.float32), n) for n, a in inits.items()],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _samples(count: int = 24, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"x": rng.standard_normal((1, CHANNELS, SIZE, SIZE)).astype(np.float32)}
        for _ in range(count)
    ]


def _grid_of(path, tensor: str) -> tuple[float, float]:
    """(lowest, highest) value the written QuantizeLinear of `tensor` can hold."""
    model = onnx.load(path)
    arrays = {i.name: nh.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] == tensor:
            scale = float(arrays[node.input[1]])
            zero = int(arrays[node.input[2]])
            info = np.iinfo(arrays[node.input[2]].dtype)
            return (info.min - zero) * scale, (info.max - zero) * scale
    raise AssertionError(f"no QuantizeLinear reads {tensor}")


def _sqnr(model_path, quantized_path, samples) -> float:
    reference = ort.InferenceSession(str(model_path))
    candidate = ort.InferenceSession(str(quantized_path))
    signal = noise = 0.0
    for feeds in samples:
        want = reference.run(None, feeds)[0]
        got = candidate.run(None, feeds)[0]
        signal += float((want.astype(np.float64) ** 2).sum())
        noise += float(((want - got).astype(np.float64) ** 2).sum())
    return 10.0 * np.log10(signal / noise)


def _quantize_both(tmp_path, model, monkeypatch):
    """(model path, cut output, uncut output): the same plan with and without the cut."""
    samples = _samples()
    model_path, cut, _, _ = testing.quantize_fast(model, tmp_path, "cut", samples)
    with monkeypatch.context() as patch:
        patch.setattr("qconvert.plan.activations.flat_bounds", lambda value: None)
        _, uncut, _, _ = testing.quantize_fast(model, tmp_path, "uncut", samples)
    return model_path, cut, uncut


def test_a_hardswish_input_is_gridded_from_minus_three(tmp_path, monkeypatch):
    model_path, cut, uncut = _quantize_both(tmp_path, _model([], "HardSwish"), monkeypatch)
    low, high = _grid_of(cut, "c")
    uncut_low, uncut_high = _grid_of(uncut, "c")
    assert uncut_low < -20.0
    step = (high - low) / 255
    assert -3.0 - 2 * step <= low <= -3.0
    assert high == pytest.approx(uncut_high, rel=0.02)
    # The step over [-3, max] shrinks by the share of the range left off, and the
    # output's error with it.
    assert step < 0.6 * (uncut_high - uncut_low) / 255
    eval_samples = _samples(16, seed=1)
    assert _sqnr(model_path, cut, eval_samples) > _sqnr(model_path, uncut, eval_samples) + 0.5


def test_the_edge_is_carried_back_through_increasing_scalar_affine_ops(tmp_path, monkeypatch):
    # HardSwish(c / 0.5 - (-0.5)) is flat where 2 c + 0.5 <= -3: c <= -1.75. (A Mul and
    # an Add right after a Conv fold into its weight and bias when the model is prepared.)
    model = _model([("Div", 0.5), ("Sub", -0.5)], "HardSwish")
    _, cut, _ = _quantize_both(tmp_path, model, monkeypatch)
    low, high = _grid_of(cut, "c")
    step = (high - low) / 255
    assert -1.75 - 2 * step <= low <= -1.75


def _first_conv_output(model: onnx.ModelProto):
    import onnx_ir as ir

    graph = ir.from_proto(model).graph
    return next(node for node in graph if node.name == "conv1").outputs[0]


@pytest.mark.parametrize(
    ("between", "reader", "bounds"),
    [
        ([], "HardSigmoid", (-2.0, 2.0)),  # alpha 0.25, beta 0.5
        ([], "Clip", (-1.0, 4.0)),
        ([], "Relu", (0.0, np.inf)),
        ([("Sub", 1.0), ("Div", 4.0)], "Clip", (-3.0, 17.0)),  # (c - 1) / 4 in [-1, 4]
    ],
)
def test_flat_edges_of_each_reader(between, reader, bounds):
    """A Conv's clamp is folded into its output's quantization; elsewhere (a tensor a
    float op writes) these edges cut the range."""
    assert flat_ranges.flat_bounds(_first_conv_output(_model(between, reader))) == bounds


def test_a_reader_that_is_not_flat_keeps_the_whole_range(tmp_path, monkeypatch):
    _, cut, uncut = _quantize_both(
        tmp_path, _model([], "HardSwish", residual=True), monkeypatch
    )
    assert _grid_of(cut, "c") == _grid_of(uncut, "c")


@pytest.mark.parametrize(("op", "constant"), [("Mul", -2.0), ("Sub", None), ("Div", None)])
def test_decreasing_or_non_affine_maps_carry_no_edge(op, constant):
    """c * -2 flips the flat side; k - c decreases; k / c is not affine: no bounds."""
    import onnx_ir as ir

    model = ir.from_proto(_model([], "HardSwish"))
    conv = next(node for node in model.graph if node.name == "conv1")
    act = next(node for node in model.graph if node.name == "act")
    k = ir.Value(
        name="k",
        const_value=ir.tensor(np.array([2.0 if constant is None else constant], np.float32)),
    )
    model.graph.initializers["k"] = k
    inputs = [conv.outputs[0], k] if op == "Mul" else [k, conv.outputs[0]]
    node = ir.node(op, inputs, name="map")
    model.graph.insert_before(act, node)
    act.replace_input_with(0, node.outputs[0])
    assert flat_ranges.flat_bounds(conv.outputs[0]) is None
    assert flat_ranges.flat_bounds(node.outputs[0]) == (-3.0, np.inf)


def test_cut_range_keeps_one_step_past_each_edge():
    cut = flat_ranges.cut_range(TensorRange(-40.0, 40.0), (-3.0, np.inf), 255)
    assert cut.max == 40.0
    assert cut.min == pytest.approx(-3.0 - 43.0 / 255)
    assert flat_ranges.cut_range(TensorRange(0.0, 5.0), (-3.0, np.inf), 255) == TensorRange(
        0.0, 5.0
    )
