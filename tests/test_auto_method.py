"""`--method auto`: the range of least expected error, chosen per tensor."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import qconvert
from qconvert import testing
from qconvert.calibration import RangeMethod, TensorObserver, tensor_range
from qconvert.calibration.auto import CANDIDATES, choose_range, expected_error


def _observe(values: np.ndarray) -> TensorObserver:
    observer = TensorObserver()
    observer.update(values.astype(np.float32))
    return observer


def test_auto_picks_a_clipping_method_on_a_heavy_tailed_tensor():
    # Two extreme values among 2M ordinary ones stretch minmax's grid 200-fold: clipping
    # them costs far less squared error than rounding everything else that coarsely.
    values = np.random.default_rng(0).standard_normal(2_000_000)
    values[:2] = (1000.0, -800.0)
    observer = _observe(values)
    choice = choose_range(observer, RangeMethod(name="auto"))
    assert set(choice.errors) == set(CANDIDATES)
    assert choice.method in ("percentile", "entropy", "mse")
    assert choice.method == min(choice.errors, key=choice.errors.get)
    assert choice.range.max < observer.max / 4 and choice.range.min > observer.min / 4
    assert choice.errors[choice.method] < 0.5 * choice.errors["minmax"]


def test_auto_keeps_minmax_on_a_laplace_tensor_where_clipping_gains_little():
    # Laplace: clipping cuts the expected error by about a quarter, short of MIN_GAIN.
    observer = _observe(np.random.default_rng(0).laplace(size=200_000))
    choice = choose_range(observer, RangeMethod(name="auto"))
    assert choice.errors["mse"] < choice.errors["minmax"]
    assert choice.method == "minmax"


def test_auto_keeps_minmax_when_clipping_rare_far_outliers_costs_more():
    # Twenty values at 30..60 among 400k Gaussian ones: clipping them to the bulk's edge
    # costs more squared error than the coarser grid that keeps them.
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.standard_normal(400_000), rng.uniform(30, 60, 20)])
    choice = choose_range(_observe(values), RangeMethod(name="auto"))
    assert choice.errors["percentile"] > choice.errors["minmax"]
    assert choice.method == "minmax"


def test_auto_keeps_minmax_on_a_uniform_tensor():
    values = np.random.default_rng(0).uniform(-3.0, 5.0, 200_000)
    observer = _observe(values)
    choice = choose_range(observer, RangeMethod(name="auto"))
    assert choice.method == "minmax"
    assert (choice.range.min, choice.range.max) == (observer.min, observer.max)
    assert tensor_range(observer, RangeMethod(name="auto")) == choice.range


def test_expected_error_is_the_rounding_noise_inside_the_range():
    observer = _observe(np.random.default_rng(0).uniform(0.0, 255.0, 100_000))
    full = tensor_range(observer, RangeMethod(name="minmax"))
    step = (full.max - 0.0) / 255
    assert np.isclose(expected_error(observer, full, 8), step**2 / 12, rtol=1e-9)


def test_quantize_report_lists_the_choice_per_tensor(run_cli, tiny_cnn, tmp_path):
    out, report = tmp_path / "auto.onnx", tmp_path / "auto.json"
    result = run_cli(
        "quantize",
        tiny_cnn,
        "--data",
        tmp_path / "calib",
        "-o",
        out,
        "--report",
        report,
        "--method",
        "auto",
    )
    assert result.code == 0, result.err
    conversion = json.loads(report.read_text())["conversion"]
    assert conversion["range_methods"]
    assert set(conversion["range_methods"].values()) <= set(CANDIDATES)
    assert "ranges (auto)" in result.out


def test_minmax_reports_no_choices(run_cli, tiny_cnn, tmp_path):
    out, report = tmp_path / "mm.onnx", tmp_path / "mm.json"
    result = run_cli(
        "quantize",
        tiny_cnn,
        "--data",
        tmp_path / "calib",
        "-o",
        out,
        "--report",
        report,
        "--method",
        "minmax",
    )
    assert result.code == 0, result.err
    assert json.loads(report.read_text())["conversion"]["range_methods"] == {}


def test_a_tensor_far_from_zero_is_ranged_in_bounded_memory():
    # Values in [1000, 1001] fold into millions of |x| bins; entropy must not build a
    # candidates x levels table of them (it took gigabytes before the bins were merged).
    values = 1000.0 + np.random.default_rng(0).uniform(0.0, 1.0, 10_000)
    observer = _observe(values)
    for name in ("auto", "entropy"):
        chosen = tensor_range(observer, RangeMethod(name=name))
        assert observer.min <= chosen.max <= observer.max


# --- the model-level check against minmax (qconvert.pipelines.auto_check) ----------------

_SHAPE = (1024, 64)


def _one_op_model(op_type: str) -> onnx.ModelProto:
    """x @ I -> Sigmoid, or x @ I -> Relu -> r * r; then a MatMul to y.

    The MatMul by the identity gives the op a quantized input; the last, a quantized output.
    """
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(_SHAPE))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [_SHAPE[0], 16])
    nodes = [helper.make_node("MatMul", ["x", "identity"], ["t"], name="identity")]
    if op_type == "Sigmoid":
        nodes.append(helper.make_node("Sigmoid", ["t"], ["h"], name="sigmoid"))
    else:
        nodes.append(helper.make_node("Relu", ["t"], ["r"], name="relu"))
        nodes.append(helper.make_node("Mul", ["r", "r"], ["h"], name="square"))
    weights = np.random.default_rng(1).standard_normal((_SHAPE[1], 16)).astype(np.float32)
    nodes.append(helper.make_node("MatMul", ["h", "w"], ["y"], name="matmul"))
    initializers = [
        numpy_helper.from_array(np.eye(_SHAPE[1], dtype=np.float32), "identity"),
        numpy_helper.from_array(weights, "w"),
    ]
    graph = helper.make_graph(nodes, "one_op", [x], [y], initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _samples_with_one_outlier(folder):
    # One value of 1000 among a million ordinary ones: per tensor, clipping it costs far
    # less squared error than rounding the million on a grid stretched to reach it.
    rng = np.random.default_rng(0)
    samples = [{"x": rng.standard_normal(_SHAPE).astype(np.float32)} for _ in range(16)]
    samples[0]["x"][0, 7] = 1000.0
    return testing.write_samples(folder, samples)


def _quantized(tmp_path, op_type, *args):
    model = testing.save(_one_op_model(op_type), tmp_path / f"{op_type}.onnx")
    data = _samples_with_one_outlier(tmp_path / "data")
    report = tmp_path / "report.json"
    qconvert.quantize(model, tmp_path / "q.onnx", data=data, report=report)
    conversion = json.loads(report.read_text())["conversion"]
    notes = [note for note in conversion["notes"] if note.startswith("Range method auto")]
    return conversion["range_methods"], notes


def test_auto_keeps_its_clipping_where_the_model_scores_better_with_it(tmp_path):
    # Sigmoid saturates: the clipped outlier costs nothing at the output, while minmax's
    # grid (step 7.8) rounds every ordinary input to 0 or +-7.8.
    methods, notes = _quantized(tmp_path, "Sigmoid")
    assert methods["t"] != "minmax"  # the Sigmoid's input
    assert len(notes) == 1 and "clipped" in notes[0]
    clipped_db, minmax_db = _scores(notes[0])
    assert clipped_db > minmax_db + 20


def test_auto_falls_back_to_minmax_where_clipping_costs_the_output(tmp_path):
    # Squaring makes the outlier a million times the energy of everything else: clipping
    # it, which halves the input's expected error, ruins the output.
    methods, notes = _quantized(tmp_path, "Mul")
    assert set(methods.values()) == {"minmax"}
    assert len(notes) == 1 and "so every range is minmax" in notes[0]
    clipped_db, minmax_db = _scores(notes[0])
    assert clipped_db + 20 < minmax_db


def _scores(note: str) -> tuple[float, float]:
    """The output SQNR of the clipped plan and of the minmax plan, from auto's note."""
    clipped, minmax = re.findall(r"(-?[\d.]+) dB", note)[:2]
    return float(clipped), float(minmax)


def test_auto_without_samples_to_check_on_keeps_minmax(tmp_path):
    model = testing.save(_one_op_model("Sigmoid"), tmp_path / "model.onnx")
    data = _samples_with_one_outlier(tmp_path / "data")
    calib = tmp_path / "model.calib.json"
    qconvert.calibrate(model, data, output=calib)
    report = tmp_path / "report.json"
    qconvert.quantize(model, tmp_path / "q.onnx", calib=calib, report=report)
    conversion = json.loads(report.read_text())["conversion"]
    assert set(conversion["range_methods"].values()) == {"minmax"}
    assert any("no samples to check" in note for note in conversion["notes"])


def test_auto_keeps_minmax_unless_clipping_halves_the_output_error(tmp_path):
    # Scored on the calibration samples the clipping was fitted to, a small gain does not
    # carry over to other data: clipping must gain 3 dB (half the noise energy).
    from qconvert.calibration import Calibration
    from qconvert.pipelines.auto_check import MIN_OUTPUT_GAIN_DB, check_against_minmax
    from qconvert.plan import QuantPlan, Role, TensorDecision
    from qconvert.qparams import range_qparams
    from qconvert.schemes import SCHEMES
    from qconvert.sensitivity import Score

    observer = _observe(np.random.default_rng(0).standard_normal(10_000))
    calibration = Calibration(
        model_sha256="0" * 64, model_file="m.onnx", samples=1, observers={"t": observer}
    )
    params = range_qparams(-1.0, 1.0, np.dtype(np.uint8), symmetric=False)
    decision = TensorDecision("t", Role.ACTIVATION, params, "input of n")

    def plan(label):
        return QuantPlan(
            scheme=SCHEMES["int8"], tensors={"t": decision}, nodes=(), folds=(), notes=(label,)
        )

    class Scores:
        samples = [{}] * 16

        def __init__(self, clipped_db):
            self.db = {"clipped": clipped_db, "minmax": 20.0}

        def scores_side_by_side(self):
            return True

        def score_each(self, scored):
            return [Score(sqnr_db=self.db[p.notes[0]], top1_drop_points=None) for p in scored]

    assert np.isclose(MIN_OUTPUT_GAIN_DB, 10 * np.log10(2))
    for clipped_db, kept in ((22.9, "minmax"), (23.1, "clipped")):
        checked = check_against_minmax(
            plan("clipped"),
            ranges={"t": observer.finalize()},
            choices={"t": "percentile"},
            calibration=calibration,
            method=RangeMethod(name="auto"),
            plan_with=lambda ranges: plan("minmax"),
            evaluator=lambda clipped_db=clipped_db: Scores(clipped_db),
            samples_from="calibration",
        )
        assert checked.plan.notes[0] == kept
        assert checked.choices["t"] == ("minmax" if kept == "minmax" else "percentile")
