"""`--method auto`: the range of least expected error, chosen per tensor."""

from __future__ import annotations

import json

import numpy as np

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
        "quantize", tiny_cnn, "--data", tmp_path / "calib", "-o", out, "--report", report,
        "--method", "auto",
    )
    assert result.code == 0, result.err
    conversion = json.loads(report.read_text())["conversion"]
    assert conversion["range_methods"]
    assert set(conversion["range_methods"].values()) <= set(CANDIDATES)
    assert "ranges (auto)" in result.out


def test_minmax_reports_no_choices(run_cli, tiny_cnn, tmp_path):
    out, report = tmp_path / "mm.onnx", tmp_path / "mm.json"
    result = run_cli(
        "quantize", tiny_cnn, "--data", tmp_path / "calib", "-o", out, "--report", report,
        "--method", "minmax",
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
