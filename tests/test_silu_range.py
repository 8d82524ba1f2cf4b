"""A tensor only a SiLU reads is quantized without the negative tail SiLU flattens.

SiLU(x) = x * sigmoid(x), exported as Sigmoid(x) and Mul(x, Sigmoid(x)), is within 0.28
of zero for every negative x. The range of its input keeps its top and starts where
cutting moves SiLU by no more than half the grid's step (`plan.silu`). Checked on the
range arithmetic against a dense evaluation of SiLU, and on a Conv -> SiLU -> Conv model
run in onnxruntime against the same model planned without the rule.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from qconvert import qparams, testing
from qconvert.calibration import TensorRange
from qconvert.calibration.observers import TensorObserver
from qconvert.plan import activations
from qconvert.plan.silu import SILU_MINIMUM_AT, silu_input, silu_input_range

CHANNELS, WIDE, SIZE = 8, 16, 12


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _observed(values: np.ndarray) -> TensorObserver:
    observer = TensorObserver()
    observer.update(values.astype(np.float32))
    return observer


def _silu_error(values: np.ndarray, low: float, high: float) -> float:
    """Mean squared error of SiLU after a uint8 QuantizeLinear/DequantizeLinear on
    [low, high], as onnxruntime rounds (half to even), not as the rule estimates it."""
    params = qparams.range_qparams(low, high, np.uint8, symmetric=False)
    scale, zero = float(params.scale), int(params.zero_point)
    stored = np.clip(np.rint(values / scale) + zero, 0, 255)
    return float(np.mean((_silu((stored - zero) * scale) - _silu(values)) ** 2))


def _mixture(tail_share: float, count: int = 200_000) -> np.ndarray:
    """A BN-normalised Conv's output: values around a few units, a share of them in a
    long negative tail, a few large positive ones."""
    rng = np.random.default_rng(0)
    tail = int(count * tail_share)
    return np.concatenate(
        [
            rng.normal(2.0, 3.0, count - tail - 200),
            -np.abs(rng.normal(0.0, 40.0, tail)),
            rng.uniform(30.0, 60.0, 200),
        ]
    )


@pytest.mark.parametrize("tail_share", [0.1, 0.3, 0.6, 0.95])
def test_the_chosen_range_errs_least_after_silu(tail_share):
    values = _mixture(tail_share)
    seen = TensorRange(float(values.min()), float(values.max()))
    chosen = silu_input_range(seen, _observed(values), 255, symmetric=False)
    assert chosen.max == seen.max
    assert seen.min <= chosen.min <= SILU_MINIMUM_AT + 1e-6
    error = _silu_error(values, chosen.min, chosen.max)
    # Against the calibrated range and a sweep of other cuts, each simulated: the choice
    # is within 5% of the best of them.
    others = [_silu_error(values, low, seen.max) for low in np.linspace(seen.min, -1.3, 40)]
    assert error <= 1.05 * min(others)
    assert error <= _silu_error(values, seen.min, seen.max)


def test_a_tensor_mostly_on_the_positive_side_drops_its_tail():
    values = _mixture(0.1)
    seen = TensorRange(float(values.min()), float(values.max()))
    chosen = silu_input_range(seen, _observed(values), 255, symmetric=False)
    assert chosen.min > 0.25 * seen.min
    assert _silu_error(values, chosen.min, chosen.max) < 0.5 * _silu_error(
        values, seen.min, seen.max
    )


def test_a_range_that_does_not_reach_past_silus_minimum_is_kept():
    values = np.random.default_rng(0).uniform(-1.0, 5.0, 10_000)
    seen = TensorRange(float(values.min()), float(values.max()))
    assert silu_input_range(seen, _observed(values), 255, symmetric=False) == seen
    positive = TensorRange(0.5, 9.0)
    assert (
        silu_input_range(positive, _observed(values + 1.5), 255, symmetric=False) == positive
    )


def test_a_finer_grid_cuts_less():
    values = _mixture(0.3)
    seen = TensorRange(float(values.min()), float(values.max()))
    uint8 = silu_input_range(seen, _observed(values), 255, symmetric=False)
    int16 = silu_input_range(seen, _observed(values), 65535, symmetric=True)
    assert uint8.min > int16.min


def _model(bias: float = 0.0, other_reader: bool = False) -> onnx.ModelProto:
    """Conv (CHANNELS -> WIDE, outputs of spread ~13 around `bias`) -> Sigmoid, Mul (SiLU)
    -> Conv (WIDE -> 4); with `other_reader`, the first Conv's output is also a second
    graph output's input (a Relu), so SiLU is not all that reads it."""
    rng = np.random.default_rng(0)
    nodes = [
        h.make_node("Conv", ["input", "w1", "b1"], ["c"], name="conv1", pads=[1] * 4),
        h.make_node("Sigmoid", ["c"], ["s"], name="act_sigmoid"),
        h.make_node("Mul", ["c", "s"], ["a"], name="act_mul"),
        h.make_node("Conv", ["a", "w2", "b2"], ["output"], name="conv2", pads=[1] * 4),
    ]
    outputs = [h.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4, SIZE, SIZE])]
    if other_reader:
        nodes.append(h.make_node("Relu", ["c"], ["r"], name="other"))
        outputs.append(
            h.make_tensor_value_info("r", TensorProto.FLOAT, ["N", WIDE, SIZE, SIZE])
        )
    inits = {
        "w1": rng.standard_normal((WIDE, CHANNELS, 3, 3)) * 1.5,
        "b1": np.full(WIDE, bias),
        "w2": rng.standard_normal((4, WIDE, 3, 3)) * 0.2,
        "b2": np.zeros(4),
    }
    graph = h.make_graph(
        nodes,
        "silu",
        [h.make_tensor_value_info("input", TensorProto.FLOAT, ["N", CHANNELS, SIZE, SIZE])],
        outputs,
        [nh.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _samples(count: int) -> list[dict]:
    rng = np.random.default_rng(1)
    return [
        {"input": rng.standard_normal((1, CHANNELS, SIZE, SIZE)).astype(np.float32)}
        for _ in range(count)
    ]


def _sqnr(reference, candidate, samples) -> float:
    ref = ort.InferenceSession(str(reference), providers=["CPUExecutionProvider"])
    cand = ort.InferenceSession(str(candidate), providers=["CPUExecutionProvider"])
    want = np.concatenate([ref.run(["output"], s)[0] for s in samples])
    got = np.concatenate([cand.run(["output"], s)[0] for s in samples])
    return float(10 * np.log10(np.sum(want**2) / np.sum((want - got) ** 2)))


def _input_range(path) -> tuple[float, float]:
    """The range the written model quantizes conv1's output to."""
    model = onnx.load(path)
    inits = {i.name: nh.to_array(i) for i in model.graph.initializer}
    node = next(
        n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "c"
    )
    scale, zero = float(inits[node.input[1]]), int(inits[node.input[2]])
    return -zero * scale, (255 - zero) * scale


def test_silu_input_is_found_only_where_silu_is_all_that_reads_it():
    model = ir.from_proto(_model())
    values = {v.name: v for node in model.graph for v in node.outputs}
    assert silu_input(values["c"])
    assert not silu_input(values["a"])
    shared = ir.from_proto(_model(other_reader=True))
    values = {v.name: v for node in shared.graph for v in node.outputs}
    assert not silu_input(values["c"])


def _quantized_with_and_without(tmp_path, monkeypatch, model, name):
    samples = _samples(16)
    path, cut, _, _ = testing.quantize_fast(model, tmp_path, f"{name}_cut", samples)
    with monkeypatch.context() as patch:
        patch.setattr(activations, "silu_input", lambda value: False)
        _, whole, _, _ = testing.quantize_fast(model, tmp_path, f"{name}_whole", samples)
    gained = _sqnr(path, cut, samples) - _sqnr(path, whole, samples)
    return _input_range(cut), _input_range(whole), gained


def test_cutting_silus_tail_lowers_the_output_error(tmp_path, monkeypatch):
    (low, high), (whole_low, whole_high), gained = _quantized_with_and_without(
        tmp_path, monkeypatch, _model(bias=0.0), "centred"
    )
    # Half the values are negative, most of them far from SiLU's curve: the cut keeps the
    # top and a few units of tail, and the positive side gets a finer step.
    assert whole_low < -30.0
    assert -10.0 < low <= SILU_MINIMUM_AT + 1e-3
    assert high == pytest.approx(whole_high, rel=0.02)
    assert gained > 0.8, gained  # 1.2 dB when written


def test_a_tensor_living_in_the_tail_keeps_the_tail_silu_still_bends(tmp_path, monkeypatch):
    # Bias -12: most values lie where SiLU is near, but not at, zero. A rule on the range
    # alone (cut where SiLU moves by at most half a step: at -3.8 here) lost 6.7 dB, as
    # they all read as SiLU(-3.8) = -0.08; weighed by the histogram the cut goes deeper.
    (low, _), (whole_low, _), gained = _quantized_with_and_without(
        tmp_path, monkeypatch, _model(bias=-12.0), "tail"
    )
    assert whole_low < low < -6.0
    assert gained > 0.8, gained  # 1.5 dB when written


def test_a_tensor_another_op_reads_keeps_its_range(tmp_path):
    samples = _samples(16)
    model = _model(other_reader=True)
    _, out, _, _ = testing.quantize_fast(model, tmp_path, "shared", samples)
    low, _ = _input_range(out)
    assert low < -30.0
