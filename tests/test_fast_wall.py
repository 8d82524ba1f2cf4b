"""What `quantize --recipe fast` no longer does after calibration keeps every output the same.

- The report's sizes come from what the run knows: the float model's file alone when it
  keeps no external data, and the bytes written for the model saved whole. The files are
  not read through again, and the sizes are those on disk, data files included.
- `auto`'s check scores its two plans side by side (`Evaluator.score_each`): each plan
  scores as it does alone, in the order given.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qconvert import api, testing
from qconvert import model as model_io


def _on_disk(path: Path) -> int:
    """The model file's bytes plus those of any data file saved beside it."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_report_sizes_are_the_files_on_disk(tmp_path, monkeypatch, external):
    model = testing.conv_bn_relu(channels=16)
    folder = tmp_path / "float"
    folder.mkdir()
    save = testing.save_with_external_data if external else testing.save
    path = save(model, folder / "model.onnx")
    testing.write_samples(
        tmp_path / "calib", [testing.random_inputs(model, seed=i) for i in range(8)]
    )
    scanned: list[Path] = []
    scan = model_io._may_name_external_data
    monkeypatch.setattr(
        model_io, "_may_name_external_data", lambda p: scanned.append(Path(p)) or scan(p)
    )
    out = tmp_path / "q.onnx"
    report = api.quantize(
        path, out, data=tmp_path / "calib", eval_data=tmp_path / "calib", recipe="fast"
    )
    sizes = (_on_disk(path), _on_disk(out))
    assert (
        path.with_name("model.onnx.data").exists(),
        out.with_name("q.onnx.data").exists(),
    ) == (
        external,
        external,
    )
    assert (report.conversion.float_bytes, report.conversion.converted_bytes) == sizes
    assert (report.comparison.reference.bytes, report.comparison.candidate.bytes) == sizes
    if not external:  # the float file is read once for references (at load), the output never
        assert scanned == [path]


def _planner_and_evaluator(tmp_path):
    """A Conv-BN-Relu CNN calibrated on 8 samples: its int8 planner (raised nodes ->
    plan, minmax ranges) and an evaluator on those samples."""
    from qconvert.calibration import RangeMethod, derive_ranges, read_calibration
    from qconvert.config import QuantizeConfig
    from qconvert.pipelines.mixed_precision import planner
    from qconvert.pipelines.stages import prepare_for_scheme
    from qconvert.schemes import SCHEMES
    from qconvert.selection import NodeSelection
    from qconvert.sensitivity import Evaluator

    model = testing.conv_bn_relu(channels=16)
    path = testing.save(model, tmp_path / "model.onnx")
    samples = [testing.random_inputs(model, seed=i) for i in range(8)]
    testing.write_samples(tmp_path / "calib", samples)
    api.calibrate(path, tmp_path / "calib", output=tmp_path / "c.json")
    ranges = derive_ranges(
        read_calibration(tmp_path / "c.json").observers, RangeMethod(name="minmax")
    )
    prepared, _ = prepare_for_scheme(model_io.load_model(path), QuantizeConfig())
    plan_for = planner(prepared, SCHEMES["int8"], QuantizeConfig(), NodeSelection(), ranges)
    return plan_for, Evaluator(path.read_bytes(), prepared, samples)


@pytest.mark.parametrize("side_by_side", [True, False], ids=["side-by-side", "past-the-cap"])
def test_plans_scored_side_by_side_score_as_one_after_the_other(
    tmp_path, monkeypatch, side_by_side
):
    """`auto`'s check scores its two plans at once, each session on its share of the cores;
    past `SIDE_BY_SIDE_BYTES` of weights one after the other."""
    from qconvert import sensitivity

    plan_for, evaluator = _planner_and_evaluator(tmp_path)
    full = plan_for(frozenset())
    first = next(node.name for node in full.quantized_nodes() if node.op_type == "Conv")
    plans = (full, plan_for(frozenset({first})))
    one_after_the_other = [evaluator.score(plan) for plan in plans]
    # the two plans score apart, so an order mixed up would show
    assert one_after_the_other[0].sqnr_db != one_after_the_other[1].sqnr_db
    if not side_by_side:
        monkeypatch.setattr(sensitivity, "SIDE_BY_SIDE_BYTES", 0)
    spins = []
    make_session = sensitivity.make_session
    monkeypatch.setattr(
        sensitivity,
        "make_session",
        lambda *a, spin=True, **k: spins.append(spin) or make_session(*a, spin=spin, **k),
    )
    assert evaluator.score_each(plans) == one_after_the_other
    # side by side, the sessions' idle threads do not spin
    assert spins == [not side_by_side] * 2


def test_a_score_cut_short_bounds_the_full_score_from_above(tmp_path):
    """`score_unless_below` stops once the SQNR cannot reach the floor; its bound is
    never below the score all the samples give, and without a stop it is that score."""
    plan_for, evaluator = _planner_and_evaluator(tmp_path)
    plan = plan_for(frozenset())
    full = evaluator.score(plan).sqnr_db
    assert 10.0 < full < 80.0  # quantized, so noisy, and still close to the float model

    reached = evaluator.score_unless_below(plan, full - 0.5)
    assert (reached.exact, reached.samples, reached.sqnr_db) == (True, 8, full)
    short = evaluator.score_unless_below(plan, full + 0.5)
    assert not short.exact and short.samples < 8
    assert full <= short.sqnr_db < full + 0.5
    first = evaluator.score_unless_below(plan, float("inf"))
    assert not first.exact and first.samples == 1
    assert first.sqnr_db >= short.sqnr_db


def test_past_the_cap_the_clipping_plan_stops_early_and_writes_the_same_bytes(
    tmp_path, monkeypatch
):
    """Past `SIDE_BY_SIDE_BYTES`, `auto`'s check scores minmax first and stops scoring the
    clipping plan once it cannot gain the 3 dB: the same choice and bytes as side by side."""
    from test_auto_method import _one_op_model, _samples_with_one_outlier

    from qconvert import sensitivity

    # Squaring makes the first sample's outlier, clipped, ruin the output at once.
    model = testing.save(_one_op_model("Mul"), tmp_path / "model.onnx")
    data = _samples_with_one_outlier(tmp_path / "data")
    written, notes = [], []
    for capped in (False, True):
        if capped:
            monkeypatch.setattr(sensitivity, "SIDE_BY_SIDE_BYTES", 0)
        out = tmp_path / f"q{int(capped)}.onnx"
        report = api.quantize(model, out, data=data, recipe="fast")
        written.append(out.read_bytes())
        notes.append([n for n in report.conversion.notes if n.startswith("Range method")])
    assert written[0] == written[1]
    assert "so every range is minmax" in notes[0][0] and "bound" not in notes[0][0]
    assert "(bound after 1 of 16)" in notes[1][0] and "so every range is minmax" in notes[1][0]
    # minmax's score is the same either way
    assert notes[0][0].split("against")[1] == notes[1][0].split("against")[1]
