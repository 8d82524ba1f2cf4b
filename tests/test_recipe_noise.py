"""A recipe step is kept only where it wins on most held-out samples, not on a mean a few
carry; the decided recipe is refitted on every sample."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from conftest import sha256

import qconvert
from qconvert import testing
from qconvert.pipelines.held_out import HeldOut
from qconvert.pipelines.recipe_samples import held_out_indices
from qconvert.recipe_fidelity import Fidelity, balance_detail, wins_needed

SAMPLES = 48


def test_the_sign_test_needs_13_of_16_and_41_of_64():
    # The one-sided sign test at 2.5%: P(X >= 13 | 16, 1/2) = 0.011, P(X >= 12) = 0.038.
    assert wins_needed(16) == 13
    assert wins_needed(64) == 41
    assert wins_needed(4) == 5  # 4 of 4 happens by chance 1 time in 16: never enough


def _fidelity(per_sample, pooled=None):
    """A fidelity with these per-sample SQNRs; pooled as equal-signal samples pool."""
    per_sample = tuple(per_sample)
    if pooled is None:
        pooled = -10 * math.log10(np.mean([10 ** (-db / 10) for db in per_sample]))
    return Fidelity(sqnr_db=pooled, top1_agreement=None, per_sample_db=per_sample)


def test_a_gain_one_sample_carries_is_noise_and_one_on_every_sample_is_not():
    before = _fidelity([20.0] * 15 + [5.0])
    # The worst sample's noise dominates the pooled SQNR: fixing it alone (+15 dB) raises
    # the pooled figure by 4.2 dB while the 15 others each lose 0.5 dB.
    carried = _fidelity([19.5] * 15 + [20.0])
    assert carried.sqnr_db > before.sqnr_db + 4.0
    assert not carried.improves(before)
    assert _fidelity([20.5] * 15 + [5.5]).improves(before)  # every sample +0.5 dB
    # 13 of 16 better is enough, 12 is not (untied samples).
    assert _fidelity([21.0] * 12 + [19.9] * 3 + [6.0]).improves(before)
    assert not _fidelity([21.0] * 11 + [19.9] * 4 + [6.0]).improves(before)
    # Samples unknown (an older report's figures): the pooled rule alone.
    assert Fidelity(sqnr_db=21.0, top1_agreement=None).improves(
        Fidelity(sqnr_db=20.0, top1_agreement=None)
    )


def test_bias_correction_and_weight_rounding_are_judged_on_balance():
    before = _fidelity([20.0] * 16)
    # Most samples gain a lot, a few lose a little: better on 10 of 16, which the sign
    # test (13) calls noise, and kept on balance.
    mostly = _fidelity([23.0] * 10 + [19.5] * 6)
    assert not mostly.improves(before)
    assert mostly.better_on_balance(before)
    # Better on fewer samples than worse: dropped, however large the pooled gain.
    assert not _fidelity([26.0] * 7 + [19.8] * 9).better_on_balance(before)
    # A pooled gain one sample carries, the others losing more than they gain (though
    # better on 9 and worse on 7): dropped.
    carried = _fidelity([40.0] + [20.1] * 8 + [19.8] * 7)
    assert carried.sqnr_db >= before.sqnr_db + 0.1
    assert not carried.better_on_balance(before)
    # Worse over all samples: dropped.
    assert not _fidelity([20.05] * 16).better_on_balance(before)
    # Bias correction and weight rounding must gain 0.5 dB over all (`ON_BALANCE`).
    small = _fidelity([20.6] * 10 + [19.9] * 6)
    assert 0.1 < small.gain_db(before) < 0.5
    assert small.better_on_balance(before)
    assert not small.better_on_balance(before, min_gain_db=0.5)
    assert balance_detail(small, before, min_gain_db=0.5) == (
        "gain under 0.5 dB: better on 10/16 samples, worse on 6"
    )
    assert mostly.better_on_balance(before, min_gain_db=0.5)
    # Frames decide for sequences, where their counts resolve (32 -> 18 wrong, past the
    # spread of sqrt(50)): fewer disagreeing frames over all and on balance.
    frames_before = Fidelity(
        sqnr_db=15.0,
        top1_agreement=None,
        frame_agreement=0.8,
        frame_rows=160,
        per_sample_frames=(2,) * 16,
    )
    frames_after = dataclasses.replace(
        frames_before,
        frame_agreement=1 - 18 / 160,
        per_sample_frames=(0,) * 9 + (3,) * 4 + (2,) * 3,
    )
    assert frames_after.scored_by_frames(frames_before)
    assert not frames_after.improves(frames_before)  # 9 of 13 untied: the sign test wants 11
    assert frames_after.better_on_balance(frames_before)


def _one_large_sample_case(tmp_path):
    """One Gemm output (no classifier), a coarse per-tensor weight grid (one large
    weight), calibration inputs near 1 with two near 32; of the held-out samples one is
    near 32, the rest are small."""
    rng = np.random.default_rng(0)
    k = 32
    w = 0.05 * rng.standard_normal((1, k))
    w[0, 0] = 1.0
    path = testing.save(testing.gemm_bias(w, np.zeros(1)), tmp_path / "model.onnx")
    held = held_out_indices(SAMPLES)
    samples, large = [], 0
    for i in range(SAMPLES):
        noise = 0.05 * rng.standard_normal(k)
        if i in held:
            row = 32.0 * (1 + noise) if i == held[3] else 0.1 * rng.standard_normal() + noise
        else:
            row = (32.0 if large < 2 and i > 5 else 1.0) * (1 + noise)
            large += row[1] > 10
        samples.append({"input": row[None].astype(np.float32)})
    testing.write_samples(tmp_path / "calib", samples)
    return path


def test_a_step_whose_gain_one_sample_carries_is_dropped(tmp_path):
    path = _one_large_sample_case(tmp_path)
    config = qconvert.QuantizeConfig(per_channel=False)
    report = qconvert.quantize(
        path, tmp_path / "q.onnx", data=tmp_path / "calib", config=config
    )
    rounding = next(t for t in report.conversion.recipe.trials if t.step == "weight rounding")
    gains = np.subtract(rounding.after.per_sample_db, rounding.before.per_sample_db)
    # Weight rounding fits the large inputs: the held-out SQNR over all samples rises by
    # several dB, all of it from the one large sample; the others move a few tenths.
    assert rounding.after.sqnr_db > rounding.before.sqnr_db + 3.0
    assert int(np.argmax(gains)) == 3 and gains[3] > 20.0
    assert np.all(np.abs(np.delete(gains, 3)) < 1.0)
    assert not rounding.kept
    assert rounding.detail.startswith("gain within noise: better on")
    assert any("gain within noise" in note for note in report.conversion.notes)
    # Nothing kept, nothing raised: the model written is the single pass on all samples,
    # byte for byte.
    assert report.conversion.recipe.kept == () and report.conversion.recipe.raised == ()
    fast = tmp_path / "fast.onnx"
    qconvert.quantize(path, fast, data=tmp_path / "calib", config=config, recipe="fast")
    assert sha256(tmp_path / "q.onnx") == sha256(fast)


def test_the_held_out_score_knows_each_samples_sqnr(tmp_path):
    model = testing.conv_bn_relu()
    path = testing.save(model, tmp_path / "model.onnx")
    samples = [testing.random_inputs(model, seed=i) for i in range(4)]
    testing.write_samples(tmp_path / "calib", samples * 12)
    qconvert.quantize(path, tmp_path / "q.onnx", data=tmp_path / "calib", recipe="fast")
    scored = HeldOut(path.read_bytes(), samples).score((tmp_path / "q.onnx").read_bytes())
    expected = [testing.output_sqnr(path, tmp_path / "q.onnx", [s]) for s in samples]
    assert np.allclose(scored.per_sample_db, expected, atol=1e-6)


def test_adding_clipping_is_scored_only_on_eval_samples(tmp_path):
    # Squaring after a Relu: auto would clip the one outlier of the first sample, and its
    # model-level check falls back to minmax everywhere. The recipe's range method step
    # would then add auto's clipping back: held-out samples of the same folder share the
    # calibration's tails, so that is tried only on --eval samples.
    from test_auto_method import _SHAPE, _one_op_model

    model = testing.save(_one_op_model("Mul"), tmp_path / "model.onnx")
    rng = np.random.default_rng(0)
    samples = [{"x": rng.standard_normal(_SHAPE).astype(np.float32)} for _ in range(SAMPLES)]
    samples[0]["x"][0, 7] = 1000.0
    testing.write_samples(tmp_path / "calib", samples)
    testing.write_samples(tmp_path / "eval", samples[1:17])

    def range_trial(**kwargs):
        report = qconvert.quantize(
            model, tmp_path / "q.onnx", data=tmp_path / "calib", force=True, **kwargs
        )
        return next(t for t in report.conversion.recipe.trials if t.step == "range method")

    held_out = range_trial()
    assert held_out.after is None
    assert held_out.detail.startswith("adding auto's clipping is scored only on --eval")
    on_eval = range_trial(eval_data=tmp_path / "eval")
    assert on_eval.after is not None
