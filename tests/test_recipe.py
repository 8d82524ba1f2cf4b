"""The default recipe keeps a step only where held-out samples say it helps."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import sha256

import qconvert
from qconvert import testing
from qconvert.pipelines.recipe_samples import HELD_OUT, held_out_indices
from qconvert.recipe_result import RaiseSearch, RecipeOptions

SAMPLES = 48


def _trial(report, step):
    return next(t for t in report.conversion.recipe.trials if t.step == step)


def _gemm_case(tmp_path, *, held_out_mean: float):
    """A Gemm whose per-tensor grid is coarse (one large weight), and samples whose inputs
    share a common component of mean 1; the held-out ones have mean `held_out_mean`."""
    rng = np.random.default_rng(0)
    out_channels, k = 8, 32
    w = 0.05 * rng.standard_normal((out_channels, k))
    w[0, 0] = 1.0
    path = testing.save(testing.gemm_bias(w, np.zeros(out_channels)), tmp_path / "model.onnx")
    held = set(held_out_indices(SAMPLES))
    samples = []
    for i in range(SAMPLES):
        mean = held_out_mean if i in held else 1.0
        row = mean + rng.standard_normal() + 0.05 * rng.standard_normal(k)
        samples.append({"input": row[None].astype(np.float32)})
    testing.write_samples(tmp_path / "calib", samples)
    return path, samples


def test_a_step_that_helps_on_held_out_samples_is_kept(tmp_path):
    path, samples = _gemm_case(tmp_path, held_out_mean=1.0)
    config = qconvert.QuantizeConfig(per_channel=False)
    fast = qconvert.quantize(
        path, tmp_path / "fast.onnx", data=tmp_path / "calib", config=config, recipe="fast"
    )
    report = qconvert.quantize(
        path, tmp_path / "q.onnx", data=tmp_path / "calib", config=config
    )
    assert fast.conversion.recipe is None
    recipe = report.conversion.recipe
    assert recipe.samples == HELD_OUT and recipe.scored_on == "held-out calibration samples"
    # Decided on the held-out samples, refitted on all of them.
    assert report.conversion.calibration_samples == SAMPLES == recipe.refit_samples
    rounding = _trial(report, "weight rounding")
    assert rounding.kept and rounding.after.sqnr_db > rounding.before.sqnr_db + 3.0
    assert "weight rounding" in recipe.kept
    # The kept steps are in the written model: it beats the single pass on the held-out
    # samples by what the recipe measured.
    held = [samples[i] for i in held_out_indices(SAMPLES)]
    gained = testing.output_sqnr(path, tmp_path / "q.onnx", held) - testing.output_sqnr(
        path, tmp_path / "fast.onnx", held
    )
    assert gained > 3.0
    assert (
        abs(recipe.final.sqnr_db - testing.output_sqnr(path, tmp_path / "q.onnx", held)) < 0.5
    )
    notes = report.conversion.notes
    assert any(n.startswith("Recipe step weight rounding:") and "kept" in n for n in notes)
    assert any(n.startswith("Adaptive rounding: 1 Gemm weight") for n in notes)


def test_a_step_that_hurts_on_held_out_samples_is_dropped(tmp_path):
    # Bias correction removes the mean error the calibration inputs (mean 1) make; the
    # held-out inputs have mean -1, where that shift doubles the error instead.
    path, _ = _gemm_case(tmp_path, held_out_mean=-1.0)
    report = qconvert.quantize(
        path,
        tmp_path / "q.onnx",
        data=tmp_path / "calib",
        config=qconvert.QuantizeConfig(per_channel=False),
    )
    correction = _trial(report, "bias correction")
    assert not correction.kept
    assert correction.after.sqnr_db < correction.before.sqnr_db
    assert "bias correction" not in report.conversion.recipe.kept
    assert not any(n.startswith("Bias correction:") for n in report.conversion.notes)
    assert any(
        n.startswith("Recipe step bias correction:") and "dropped" in n
        for n in report.conversion.notes
    )


def _mixed_means_case(tmp_path, *, seed: int = 0, count: int = SAMPLES, first: int = 0):
    """The `_gemm_case` Gemm, on samples whose common component has mean 1, or 0.3 on
    three of every eight (spread so that 6 of the 16 held out are such); returns the model
    path and the samples, numbered from `first`."""
    rng = np.random.default_rng(0)
    w = 0.05 * rng.standard_normal((8, 32))
    w[0, 0] = 1.0
    path = testing.save(testing.gemm_bias(w, np.zeros(8)), tmp_path / "model.onnx")
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(first, first + count):
        mean = 0.3 if i % 8 in (1, 4, 7) else 1.0
        row = mean + 0.05 * rng.standard_normal() + 0.05 * rng.standard_normal(32)
        samples.append({"input": row[None].astype(np.float32)})
    return path, samples


def test_bias_correction_that_helps_most_samples_a_lot_is_kept_without_the_sign_test(
    tmp_path,
):
    # Bias correction shifts by the calibration mean (about 0.78): the samples of mean 1
    # gain 10-14 dB, those of mean 0.3 lose 2-10 dB. 10 of 16 held out win: the sign test
    # wants 13, but bias correction is kept on balance (`ON_BALANCE`), and it is right to:
    # unseen samples of the same mixture gain too.
    path, samples = _mixed_means_case(tmp_path)
    testing.write_samples(tmp_path / "calib", samples)
    config = qconvert.QuantizeConfig(per_channel=False)
    report = qconvert.quantize(
        path, tmp_path / "q.onnx", data=tmp_path / "calib", config=config
    )
    correction = _trial(report, "bias correction")
    gains = np.subtract(correction.after.per_sample_db, correction.before.per_sample_db)
    assert 4 <= int(np.sum(gains < 0)) <= 6 and int(np.sum(gains > 0)) < 13
    assert not correction.after.improves(correction.before)  # the sign test's verdict
    assert correction.kept and "bias correction" in report.conversion.recipe.kept
    assert correction.detail.startswith("better on 10/16 samples, worse on 6")
    fast, corrected = tmp_path / "fast.onnx", tmp_path / "bc.onnx"
    qconvert.quantize(path, fast, data=tmp_path / "calib", config=config, recipe="fast")
    qconvert.quantize(
        path,
        corrected,
        data=tmp_path / "calib",
        config=qconvert.QuantizeConfig(per_channel=False, bias_correction=True),
    )
    (tmp_path / "unseen").mkdir()
    _, unseen = _mixed_means_case(tmp_path / "unseen", seed=1, count=32, first=3)
    assert (
        testing.output_sqnr(path, corrected, unseen)
        > testing.output_sqnr(path, fast, unseen) + 3.0
    )
    # The decision is deterministic: a second run writes the same bytes.
    again = tmp_path / "again.onnx"
    qconvert.quantize(path, again, data=tmp_path / "calib", config=config)
    assert sha256(again) == sha256(tmp_path / "q.onnx")


def conv_case(tmp_path):
    """conv_bn_relu saved with SAMPLES random samples in calib/; returns the model path."""
    model = testing.conv_bn_relu()
    path = testing.save(model, tmp_path / "model.onnx")
    testing.write_samples(
        tmp_path / "calib", [testing.random_inputs(model, seed=i) for i in range(SAMPLES)]
    )
    return path


def test_the_recipe_writes_the_same_bytes_whatever_the_workers(tmp_path):
    path = conv_case(tmp_path)
    hashes = set()
    for run, workers in enumerate((1, 2, 1)):
        out = tmp_path / f"q{run}.onnx"
        qconvert.quantize(path, out, data=tmp_path / "calib", workers=workers)
        hashes.add(sha256(out))
    assert len(hashes) == 1


def test_raising_keeps_the_costliest_node_float_within_the_budget(tmp_path):
    model = testing.sensitive_mlp()
    path = testing.save(model, tmp_path / "model.onnx")
    testing.write_samples(
        tmp_path / "calib", [testing.random_inputs(model, seed=i) for i in range(SAMPLES)]
    )
    options = RecipeOptions(floor_sqnr_db=80.0, budget=1.0)
    report = qconvert.quantize(
        path, tmp_path / "q.onnx", data=tmp_path / "calib", recipe=options
    )
    recipe = report.conversion.recipe
    assert recipe.raised, report.conversion.notes
    raised = {node.name for node in recipe.raised}
    floats = {node.name: node.reason for node in report.conversion.float_nodes}
    assert raised <= set(floats)
    assert all(floats[name].startswith("raised by the recipe") for name in raised)
    assert recipe.final.sqnr_db > max(t.after.sqnr_db for t in recipe.trials if t.after)
    search = recipe.raise_search
    assert search.skipped == "" and search.best_alone is not None
    assert search.quantized >= search.affordable >= search.scored >= search.gaining
    assert search.gaining >= len(recipe.raised)
    assert any(n.startswith("Recipe raise phase: ") for n in report.conversion.notes)
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    # no budget: nothing is raised, whatever the floor
    none = qconvert.quantize(
        path,
        tmp_path / "none.onnx",
        data=tmp_path / "calib",
        recipe=RecipeOptions(floor_sqnr_db=80.0, budget=0.0),
        force=True,
    )
    assert none.conversion.recipe.raised == ()
    assert none.conversion.recipe.raise_search.skipped == "the budget is 0"
    assert "Recipe raise phase: not run: the budget is 0." in none.conversion.notes
    assert len(graph.node) > 0


def test_too_few_samples_run_the_single_pass_and_say_why(tmp_path):
    model = testing.conv_bn_relu()
    path = testing.save(model, tmp_path / "model.onnx")
    testing.write_samples(
        tmp_path / "calib", [testing.random_inputs(model, seed=i) for i in range(20)]
    )
    report = qconvert.quantize(path, tmp_path / "q.onnx", data=tmp_path / "calib")
    assert report.conversion.recipe is None
    assert any(
        n.startswith("Recipe fast (the single pass): 20 samples")
        for n in report.conversion.notes
    )
    fast = qconvert.quantize(path, tmp_path / "f.onnx", data=tmp_path / "calib", recipe="fast")
    assert sha256(tmp_path / "q.onnx") == sha256(tmp_path / "f.onnx")
    assert not any(n.startswith("Recipe") for n in fast.conversion.notes)


def test_recipe_options_on_the_command_line(run_cli, tmp_path):
    path = conv_case(tmp_path)
    out = tmp_path / "q.onnx"
    report = tmp_path / "r.json"
    result = run_cli(
        "quantize",
        path,
        "--data",
        tmp_path / "calib",
        "-o",
        out,
        "--raise-budget",
        "0",
        "--floor-sqnr",
        "99",
        "--report",
        report,
    )
    assert result.code == 0, result.err
    import json

    recipe = json.loads(report.read_text())["conversion"]["recipe"]
    assert recipe["budget"] == 0.0 and recipe["floor_sqnr_db"] == 99.0
    assert [t["step"] for t in recipe["trials"]] == [
        "float input",
        "range method",
        "bias correction",
        "weight rounding",
        "equalization",
    ]
    assert recipe["raised"] == []
    result = run_cli(
        "quantize", path, "--data", tmp_path / "calib", "-o", out, "--recipe", "slow"
    )
    assert result.code == 2 and "'slow' is not one of" in result.err


def test_the_markdown_and_html_reports_tell_the_recipe(tmp_path):
    path = conv_case(tmp_path)
    for suffix in (".md", ".html"):
        report = tmp_path / f"r{suffix}"
        qconvert.quantize(
            path, tmp_path / "q.onnx", data=tmp_path / "calib", report=report, force=True
        )
        text = report.read_text()
        assert "Recipe default, scored on 16 held-out calibration samples" in text
        for step in ("range method", "bias correction", "weight rounding", "equalization"):
            assert step in text
        assert "floor top-1 97%, expected from the margins" in text  # a classifier


def test_only_batch_by_class_outputs_count_as_classifiers():
    # A detector head ([1, 84, anchors]) is float over its last axis too; its argmax over
    # anchors is no class, so only [batch, classes] outputs get a top-1 agreement.
    from qconvert.pipelines.held_out import HeldOut

    rng = np.random.default_rng(0)
    k, n = 8, 6
    model = testing.layernorm_matmul(
        np.ones(k), np.zeros(k), rng.standard_normal((k, n)), rng.standard_normal((k, n))
    )
    samples = [{"input": rng.standard_normal((1, 4, k)).astype(np.float32)} for _ in range(4)]
    held = HeldOut(model.SerializeToString(), samples)
    assert held.score(model.SerializeToString()).top1_agreement is None
    classifier = testing.gemm_bias(rng.standard_normal((4, k)), np.zeros(4))
    rows = [{"input": rng.standard_normal((1, k)).astype(np.float32)} for _ in range(4)]
    fidelity = HeldOut(classifier.SerializeToString(), rows).score(
        classifier.SerializeToString()
    )
    assert fidelity.top1_agreement == 1.0


def _stem_chain(cheap: int = 20):
    """Gemm `stem` (16 -> 64) -> Gemm 64 -> 16 -> `cheap` Gemms 16 -> 16 -> Gemm `head`.

    The stem reads an input whose feature 0 is about 1000 and unused (zero weights): the
    input's uint8 grid is then 4 wide, and the features the stem does read (about 1)
    round to nothing. Keeping the stem float is the one cure, and it is the costliest
    node (4 x each of the cheap Gemms' multiply-accumulates).
    """
    rng = np.random.default_rng(0)
    names = ["stem", "down", *(f"g{i}" for i in range(cheap)), "head"]
    lines, inits, current = [], {}, "input"
    shapes = [(16, 64), (64, 16), *([(16, 16)] * cheap), (16, 4)]
    for index, (name, (k, n)) in enumerate(zip(names, shapes, strict=True)):
        out = "output" if name == "head" else f"h{index}"
        lines.append(f"{out} = Gemm ({current}, w_{name}, b_{name})")
        weight = rng.standard_normal((k, n)) / np.sqrt(k)
        if name.startswith("g"):
            weight *= 0.1
        if name == "stem":
            weight[0] = 0.0
        elif name not in ("down", "head"):
            weight += np.eye(k)  # a residual-like path keeps the signal alive
        inits[f"w_{name}"] = weight.astype(np.float32)
        inits[f"b_{name}"] = np.zeros(n, np.float32)
        current = out
    text = (
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        "stem_chain (float[1,16] input) => (float[1,4] output) {\n" + "\n".join(lines) + "\n}"
    )
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(
        onnx.numpy_helper.from_array(array, name) for name, array in inits.items()
    )
    for node, name in zip(model.graph.node, names, strict=True):
        node.name = name
    onnx.checker.check_model(model, full_check=True)
    return model


def test_the_first_and_last_layers_are_scored_before_the_cheapest_and_early_ones_after():
    from onnx_ir import serde

    from qconvert.pipelines.raise_phase import MAX_RANKED, ranked_candidates

    model = serde.deserialize_model(_stem_chain())
    nodes = [(node.name, node.op_type) for node in model.graph]
    costs = dict.fromkeys((name for name, _ in nodes), 0.01)
    costs["stem"] = costs["head"] = costs["down"] = 0.04
    chosen = ranked_candidates(model, nodes, costs)
    assert chosen[:2] == [("stem", "Gemm"), ("head", "Gemm")]
    # Neither an end nor among the cheapest, but the second layer: scored beyond
    # MAX_RANKED (the next two early layers, g0 and g1, are among the cheapest already).
    assert len(chosen) == MAX_RANKED + 1
    assert ("down", "Gemm") not in chosen[:MAX_RANKED]
    assert chosen[-1] == ("down", "Gemm")
    # No layers: the cheapest, in name order among equals.
    adds = [(f"a{i}", "Add") for i in range(MAX_RANKED + 2)]
    cheapest = ranked_candidates(model, adds, dict.fromkeys((name for name, _ in adds), 0.0))
    assert cheapest == sorted(adds)[:MAX_RANKED]


def quantize_outlier_stem(tmp_path):
    """`_stem_chain` quantized by the recipe on samples whose feature 0 sits near 1000 (the
    stem's error is in its input's range, which only a raise recovers): the float model's
    path, the samples and the report."""
    path = testing.save(_stem_chain(), tmp_path / "model.onnx")
    rng = np.random.default_rng(1)
    samples = []
    for _ in range(SAMPLES):
        row = rng.standard_normal((1, 16)).astype(np.float32)
        row[0, 0] = 1000.0 + rng.standard_normal()
        samples.append({"input": row})
    testing.write_samples(tmp_path / "calib", samples)
    report = qconvert.quantize(
        path,
        tmp_path / "q.onnx",
        data=tmp_path / "calib",
        recipe=RecipeOptions(floor_sqnr_db=30.0, budget=0.5),
    )
    return path, samples, report


def test_raising_finds_a_costly_first_layer(tmp_path):
    path, samples, report = quantize_outlier_stem(tmp_path)
    recipe = report.conversion.recipe
    assert recipe.start.sqnr_db < 10.0, recipe.start
    raised = [node.name for node in recipe.raised]
    # The stem is the costliest of the 23 nodes, left out of the 16 cheapest.
    assert "stem" in raised, report.conversion.notes
    assert recipe.final.sqnr_db > recipe.start.sqnr_db + 15.0, recipe
    held = [samples[i] for i in held_out_indices(SAMPLES)]
    written = testing.output_sqnr(path, tmp_path / "q.onnx", held)
    # The written model is refitted on every sample, the held-out ones too: at least as
    # good on them as what the recipe measured before the refit.
    assert written > recipe.final.sqnr_db - 0.5


def test_the_raise_phase_says_why_it_raised_nothing():
    search = RaiseSearch(quantized=70, affordable=62, scored=16, best_alone=("conv", 0.05))
    assert search.describe(0.05) == (
        "70 quantized nodes, 62 of them within the 5% budget alone, 16 scored raised alone "
        "(best: conv, +0.1 dB); none improved by 0.5 dB alone, so none was raised"
    )
    tried = RaiseSearch(
        quantized=3,
        affordable=2,
        scored=2,
        gaining=1,
        best_alone=("a", 2.0),
        rejected=("a (+2.0 dB alone): gain within noise: better on 9/16 samples (13 needed)",),
    )
    assert tried.describe(0.05).endswith(
        "; 1 improved by 0.5 dB alone; not raised: a (+2.0 dB alone): gain within noise: "
        "better on 9/16 samples (13 needed)"
    )
    assert (
        RaiseSearch(quantized=3, scored=0)
        .describe(0.01)
        .endswith("; no node's own work fits the 1% budget")
    )
