"""What `quantize --data` skips or does once for its wall time changes nothing it writes.

Each shortcut is checked against the same run without it: the written bytes and the
recipe's story are the same.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import threading

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import sha256
from test_recipe import conv_case

import qconvert
from qconvert import sensitivity, testing
from qconvert.pipelines import (
    calibration_stages,
    candidate_scoring,
    recipe,
    recipe_samples,
    weight_passes,
)
from qconvert.pipelines import quantize_stages as quantize_pipeline
from qconvert.pipelines.stages import prepares_alike
from qconvert.recipe_result import RecipeOptions

SAMPLES = 48


def test_calibrations_preparation_serves_the_scheme_and_writes_the_same_bytes(
    tmp_path, monkeypatch
):
    path = conv_case(tmp_path)
    prepared = []
    real = quantize_pipeline.prepare_for_scheme
    monkeypatch.setattr(
        quantize_pipeline,
        "prepare_for_scheme",
        lambda *args: prepared.append(1) or real(*args),
    )
    qconvert.quantize(path, tmp_path / "once.onnx", data=tmp_path / "calib", recipe="fast")
    assert prepared == []  # opset 17: calibration's preparation was the scheme's
    monkeypatch.setattr(calibration_stages, "prepares_alike", lambda *args: False)
    qconvert.quantize(path, tmp_path / "twice.onnx", data=tmp_path / "calib", recipe="fast")
    assert prepared == [1]
    assert sha256(tmp_path / "once.onnx") == sha256(tmp_path / "twice.onnx")


def test_a_model_the_scheme_upgrades_is_prepared_for_it_on_its_own():
    config = qconvert.QuantizeConfig()
    assert config.target_opset == 13
    for opset, alike in ((11, False), (13, True), (17, True)):
        model = ir.serde.deserialize_model(testing.matmul_add(opset=opset))
        assert prepares_alike(model, config) is alike, opset
    assert not prepares_alike(
        ir.serde.deserialize_model(testing.matmul_add(opset=17)),
        qconvert.QuantizeConfig(opset=21),
    )


def test_auto_check_builds_its_scorer_only_when_an_activation_clips():
    from qconvert.calibration import Calibration, RangeMethod
    from qconvert.calibration.observers import TensorObserver
    from qconvert.pipelines.auto_check import check_against_minmax
    from qconvert.plan import QuantPlan, Role, TensorDecision
    from qconvert.qparams import range_qparams
    from qconvert.schemes import SCHEMES

    observer = TensorObserver()
    observer.update(np.random.default_rng(0).standard_normal(1000).astype(np.float32))
    params = range_qparams(-1.0, 1.0, np.dtype(np.uint8), symmetric=False)
    decision = TensorDecision("t", Role.ACTIVATION, params, "input of n")
    plan = QuantPlan(
        scheme=SCHEMES["int8"], tensors={"t": decision}, nodes=(), folds=(), notes=()
    )

    def never():
        raise AssertionError("nothing clips: no scorer is needed")

    checked = check_against_minmax(
        plan,
        ranges={"t": observer.finalize()},
        choices={"t": "minmax"},
        calibration=Calibration(
            model_sha256="0" * 64, model_file="m.onnx", samples=1, observers={"t": observer}
        ),
        method=RangeMethod(name="auto"),
        plan_with=lambda ranges: pytest.fail("no other plan is needed"),
        evaluator=never,
        samples_from="calibration",
    )
    assert checked.plan is plan


def _wide_case(tmp_path):
    """Conv 1x1 -> Relu -> Conv 1x1 on [1,4,128,128], one calibration sample with four
    inputs at 30 (the others standard normal): `auto` clips the input, and the --eval
    samples (the held-out ones, none of them the outlier's) score the clipping better, so
    the recipe keeps its range method and then scores raises on top of it."""
    rng = np.random.default_rng(0)
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        wide (float[1,4,128,128] input) => (float[1,4,128,128] out) {
            conv = Conv <kernel_shape = [1,1]> (input, conv_w, conv_b)
            relu = Relu (conv)
            out = Conv <kernel_shape = [1,1]> (relu, out_w, out_b)
        }
        """
    )
    for name, shape in (
        ("conv_w", (8, 4, 1, 1)),
        ("conv_b", (8,)),
        ("out_w", (4, 8, 1, 1)),
        ("out_b", (4,)),
    ):
        array = rng.standard_normal(shape) * (0.1 if name.endswith("_b") else 1.0)
        model.graph.initializer.append(
            onnx.numpy_helper.from_array(array.astype(np.float32), name)
        )
    path = testing.save(model, tmp_path / "model.onnx")
    rng = np.random.default_rng(1)
    samples = []
    for index in range(SAMPLES):
        x = rng.standard_normal((1, 4, 128, 128)).astype(np.float32)
        if index == 5:
            assert index not in recipe_samples.held_out_indices(SAMPLES)
            x[0, 0, 0, :4] = 30.0
        samples.append({"input": x})
    testing.write_samples(tmp_path / "calib", samples)
    # Adding clipping is scored only on --eval samples (`recipe_ranges.ranges_refusal`): the
    # held-out ones, none of them the outlier's, go there.
    testing.write_samples(
        tmp_path / "eval", [samples[i] for i in recipe_samples.held_out_indices(SAMPLES)]
    )
    return path


def _story(report):
    """The recipe's result without its timings."""
    result = report.conversion.recipe
    trials = tuple(dataclasses.replace(t, seconds=0.0) for t in result.trials)
    return dataclasses.replace(result, trials=trials)


def test_the_recipes_kept_states_write_what_recomputing_them_writes(tmp_path, monkeypatch):
    path = _wide_case(tmp_path)
    options = RecipeOptions(floor_sqnr_db=80.0, budget=1.0)  # raises are scored
    other_ranges = []
    real = recipe.other_ranges
    monkeypatch.setattr(
        recipe, "other_ranges", lambda *args: other_ranges.append(1) or real(*args)
    )
    kept = qconvert.quantize(
        path,
        tmp_path / "kept.onnx",
        data=tmp_path / "calib",
        eval_data=tmp_path / "eval",
        recipe=options,
    )
    story = _story(kept)
    assert "range method" in story.kept and story.raised, kept.conversion.notes
    # Once on the float model and once on the equalized one, not once per raise scored.
    assert len(other_ranges) == 2
    other_ranges.clear()
    monkeypatch.setattr(recipe, "_once", lambda cache, key, make: make())
    again = qconvert.quantize(
        path,
        tmp_path / "again.onnx",
        data=tmp_path / "calib",
        eval_data=tmp_path / "eval",
        recipe=options,
    )
    assert len(other_ranges) > 2 + len(story.raised)
    assert sha256(tmp_path / "kept.onnx") == sha256(tmp_path / "again.onnx")
    assert _story(again) == story


def test_the_weight_passes_leave_which_nodes_are_quantized_to_the_plan(tmp_path):
    # The recipe costs a raise from its plan before the weight passes run for it
    # (`recipe.run_recipe`'s `planned`): that holds while they change weights, not nodes.
    path = conv_case(tmp_path)
    floats = {}
    for name, config in (
        ("plain", qconvert.QuantizeConfig()),
        ("weighed", qconvert.QuantizeConfig(adaround=True, bias_correction=True)),
    ):
        report = qconvert.quantize(
            path,
            tmp_path / f"{name}.onnx",
            data=tmp_path / "calib",
            config=config,
            recipe="fast",  # the passes as asked, not the recipe's choice
        )
        floats[name] = {(node.name, node.op_type) for node in report.conversion.float_nodes}
        notes = report.conversion.notes
        assert name == "plain" or any(n.startswith("Adaptive rounding") for n in notes)
    assert floats["weighed"] == floats["plain"]
    assert sha256(tmp_path / "weighed.onnx") != sha256(tmp_path / "plain.onnx")


def test_the_refit_runs_only_the_held_out_samples_again_and_writes_the_same_bytes(
    tmp_path, monkeypatch
):
    # conv_case keeps bias correction: the refit needs statistics and input means on
    # every sample. The trials measured them on the calibration samples already.
    path = conv_case(tmp_path)
    calibrated = []
    real_calibration = calibration_stages.collect_calibration
    monkeypatch.setattr(
        calibration_stages,
        "collect_calibration",
        lambda *args, **kwargs: (
            calibrated.append(len(args[2])) or real_calibration(*args, **kwargs)
        ),
    )
    measured = _count_float_runs(monkeypatch)
    report = qconvert.quantize(path, tmp_path / "shared.onnx", data=tmp_path / "calib")
    assert report.conversion.recipe.kept == ("bias correction",)
    held = len(recipe_samples.held_out_indices(SAMPLES))
    assert calibrated == [SAMPLES - held, held]
    # The trials' float passes (bias correction's means, weight rounding's inputs) run
    # the calibration samples; the refit's the held-out ones alone.
    assert measured[-1] == held and SAMPLES not in measured
    # The same run, the refit calibrating and measuring every sample afresh.
    monkeypatch.setattr(
        recipe,
        "_all_calibration",
        lambda state, stages: (
            stages.calibrate(
                state.replace(source=state.all_samples, held_out_indices=(), calibration=None)
            ).calibration
        ),
    )
    monkeypatch.setattr(weight_passes.FloatInputs, "for_samples", lambda self: type(self)())
    calibrated.clear()
    measured.clear()
    qconvert.quantize(path, tmp_path / "afresh.onnx", data=tmp_path / "calib")
    assert calibrated == [SAMPLES - held, SAMPLES] and measured[-1] == SAMPLES
    assert sha256(tmp_path / "shared.onnx") == sha256(tmp_path / "afresh.onnx")


def test_input_means_past_their_memory_bound_are_measured_again_alike(tmp_path, monkeypatch):
    # Per-sample parts past PARTS_BYTES are dropped for one sum: the refit then measures
    # every sample again, and writes the same bytes.
    path = conv_case(tmp_path)
    measured = _count_float_runs(monkeypatch)
    qconvert.quantize(path, tmp_path / "parts.onnx", data=tmp_path / "calib")
    assert measured[-1] == len(recipe_samples.held_out_indices(SAMPLES))
    monkeypatch.setattr(weight_passes, "PARTS_BYTES", 0)
    measured.clear()
    qconvert.quantize(path, tmp_path / "sums.onnx", data=tmp_path / "calib")
    assert measured[-1] == SAMPLES
    assert sha256(tmp_path / "parts.onnx") == sha256(tmp_path / "sums.onnx")


def test_the_raise_phase_scores_no_model_twice(tmp_path, monkeypatch):
    # A node raised first is the model its ranking scored alone: that score is taken,
    # not the model rebuilt and run again.
    model = testing.sensitive_mlp()
    path = testing.save(model, tmp_path / "model.onnx")
    testing.write_samples(
        tmp_path / "calib", [testing.random_inputs(model, seed=i) for i in range(SAMPLES)]
    )
    scored = []
    real = candidate_scoring.HeldOut.score

    def counted(self, model, weights=None, **options):
        # The model is its graph's bytes and the weights handed beside them.
        digest = hashlib.sha256(model)
        for name in sorted(weights or {}):
            digest.update(name.encode())
            digest.update(weights[name].tobytes())
        scored.append(digest.digest())
        return real(self, model, weights, **options)

    monkeypatch.setattr(candidate_scoring.HeldOut, "score", counted)
    options = RecipeOptions(floor_sqnr_db=80.0, budget=1.0)
    report = qconvert.quantize(
        path, tmp_path / "q.onnx", data=tmp_path / "calib", recipe=options
    )
    assert report.conversion.recipe.raised
    assert len(scored) == len(set(scored))


def test_bias_corrections_float_pass_measures_weight_roundings_first_h(tmp_path, monkeypatch):
    # The recipe tries bias correction, then weight rounding, on the same float model and
    # calibration samples: the first pass measures the first layers' H as well, and the
    # model written is the one two separate passes write.
    path = conv_case(tmp_path)
    measured = _count_float_runs(monkeypatch)
    report = qconvert.quantize(path, tmp_path / "shared.onnx", data=tmp_path / "calib")
    trials = {trial.step: trial for trial in report.conversion.recipe.trials}
    assert trials["weight rounding"].after is not None  # rounding was tried
    calibration = SAMPLES - len(recipe_samples.held_out_indices(SAMPLES))
    shared = measured.count(calibration)
    asked = []
    real_wanted = weight_passes.FloatInputs.first_grams_wanted
    monkeypatch.setattr(
        weight_passes.FloatInputs,
        "first_grams_wanted",
        lambda self, prepared, plan: asked.append(1) or real_wanted(self, prepared, plan),
    )
    qconvert.quantize(path, tmp_path / "asked.onnx", data=tmp_path / "calib")
    assert len(asked) == 1  # once, for the pass over every calibration sample
    monkeypatch.setattr(
        weight_passes.FloatInputs, "first_grams_wanted", lambda self, prepared, plan: []
    )
    measured.clear()
    qconvert.quantize(path, tmp_path / "apart.onnx", data=tmp_path / "calib")
    assert measured.count(calibration) == shared + 1
    assert sha256(tmp_path / "shared.onnx") == sha256(tmp_path / "apart.onnx")


def test_bias_correction_measures_no_h_where_rounding_does_not_follow(tmp_path, monkeypatch):
    # The recipe's equalized model is corrected (bias correction kept) but not rounded
    # when weight rounding was dropped: its float pass then measures no H for rounding.
    path = conv_case(tmp_path)
    seen = []
    real = quantize_pipeline.correct_biases_of
    monkeypatch.setattr(
        quantize_pipeline,
        "correct_biases_of",
        lambda prepared, plan, source, originals, inputs=None: (
            seen.append((prepared, plan, source))
            or real(prepared, plan, source, originals, inputs)
        ),
    )
    config = qconvert.QuantizeConfig(bias_correction=True)
    qconvert.quantize(path, tmp_path / "q.onnx", data=tmp_path / "calib", config=config)
    prepared, plan, source = seen[0]
    asked = []

    def grams_of():
        asked.append(1)
        return weight_passes.FloatInputs().first_grams_wanted(prepared, plan)

    rounding = weight_passes.FloatInputs()
    means = rounding.means(prepared, plan, source, grams_of=grams_of)
    assert asked and rounding.grams  # H of the first layers, for rounding to take
    asked.clear()
    alone = weight_passes.FloatInputs(rounding_follows=False)
    assert not asked
    alone_means = alone.means(prepared, plan, source, grams_of=grams_of)
    assert not asked and not alone.grams
    assert means.keys() == alone_means.keys()
    for name, mean in means.items():
        assert np.array_equal(mean, alone_means[name])  # the same means either way


def _count_float_runs(monkeypatch) -> list[int]:
    """The sample counts of the weight passes' float runs, in the order they run."""
    measured = []
    real_runs = weight_passes._float_runs
    monkeypatch.setattr(
        weight_passes,
        "_float_runs",
        lambda model, names, source: (
            measured.append(len(source)) or real_runs(model, names, source)
        ),
    )
    return measured


class _InTurn:
    """An executor that runs each job when it is submitted: scoring one at a time."""

    def __init__(self, max_workers=None):
        del max_workers

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, job, *args, **kwargs):
        future = concurrent.futures.Future()
        future.set_result(job(*args, **kwargs))
        return future


def _sensitive_mlp_with_samples(tmp_path):
    """An MLP the raise phase raises a node of, saved, with its calibration folder."""
    model = testing.sensitive_mlp()
    path = testing.save(model, tmp_path / "model.onnx")
    testing.write_samples(
        tmp_path / "calib", [testing.random_inputs(model, seed=i) for i in range(SAMPLES)]
    )
    return path


def _scoring_threads(monkeypatch) -> list[bool]:
    """Whether each held-out scoring ran on the main thread, in order, as it happens."""
    on_main = []
    real = candidate_scoring.HeldOut.score

    def noted(self, model, weights=None, **options):
        on_main.append(threading.current_thread() is threading.main_thread())
        return real(self, model, weights, **options)

    monkeypatch.setattr(candidate_scoring.HeldOut, "score", noted)
    return on_main


def test_raise_candidates_scored_beside_the_next_build_write_the_same_bytes(
    tmp_path, monkeypatch
):
    # The ranking scores each candidate on a thread while the next one is built; the
    # scores, and so the raises and the bytes, are those of scoring one at a time.
    path = _sensitive_mlp_with_samples(tmp_path)
    threads = _scoring_threads(monkeypatch)
    options = RecipeOptions(floor_sqnr_db=80.0, budget=1.0)
    stories = []
    for name in ("beside", "in_turn"):
        report = qconvert.quantize(
            path, tmp_path / f"{name}.onnx", data=tmp_path / "calib", recipe=options
        )
        story = report.conversion.recipe
        trials = tuple(dataclasses.replace(trial, seconds=0.0) for trial in story.trials)
        stories.append(dataclasses.replace(story, trials=trials))  # all but the times
        monkeypatch.setattr(candidate_scoring, "ThreadPoolExecutor", _InTurn)
    assert stories[0].raised and stories[0] == stories[1]
    assert sha256(tmp_path / "beside.onnx") == sha256(tmp_path / "in_turn.onnx")
    beside = threads[: len(threads) // 2]
    assert threads.count(False) > 0 and beside.count(False) == threads.count(False)


def test_raise_candidates_past_the_side_by_side_cap_are_scored_one_at_a_time(
    tmp_path, monkeypatch
):
    # Past `SIDE_BY_SIDE_BYTES` of weights no second candidate and session are alive
    # beside the next build: every score runs on the main thread, and the bytes are those
    # of the candidates scored beside the next build.
    path = _sensitive_mlp_with_samples(tmp_path)
    options = RecipeOptions(floor_sqnr_db=80.0, budget=1.0)
    qconvert.quantize(path, tmp_path / "beside.onnx", data=tmp_path / "calib", recipe=options)
    on_main = _scoring_threads(monkeypatch)
    monkeypatch.setattr(sensitivity, "SIDE_BY_SIDE_BYTES", 0)
    report = qconvert.quantize(
        path, tmp_path / "capped.onnx", data=tmp_path / "calib", recipe=options
    )
    assert report.conversion.recipe.raised
    assert on_main and all(on_main)
    assert sha256(tmp_path / "capped.onnx") == sha256(tmp_path / "beside.onnx")
