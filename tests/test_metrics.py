"""Metric math against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qconvert.metrics import OutputAccumulator, cosine, relative_error, sqnr_db, top_k_overlap


def _metrics(reference, candidate, *, batches=1):
    accumulator = OutputAccumulator("out")
    for ref, cand in zip(
        np.array_split(reference, batches), np.array_split(candidate, batches), strict=True
    ):
        accumulator.update(ref, cand)
    return accumulator.result()


def test_identical_outputs_have_infinite_sqnr_and_cosine_one():
    reference = np.random.default_rng(0).standard_normal((6, 10)).astype(np.float32)
    result = _metrics(reference, reference.copy())
    assert result.sqnr_db == math.inf
    assert result.cosine == pytest.approx(1.0, abs=1e-12)
    assert result.max_abs_error == 0.0
    assert result.mean_abs_error == 0.0
    assert result.relative_error == 0.0
    assert result.top1_agreement == 1.0
    assert result.top5_overlap == 1.0
    assert result.values == 60
    assert result.nonfinite_reference == result.nonfinite_candidate == 0


def test_known_noise_gives_known_sqnr():
    # r = 2 everywhere, e = +-0.2 alternating: sum r^2 = 4n, sum e^2 = 0.04n -> 20 dB.
    n = 1000
    reference = np.full((10, n // 10), 2.0, np.float32)
    noise = np.where(np.arange(n) % 2 == 0, 0.2, -0.2).reshape(reference.shape)
    candidate = (reference + noise).astype(np.float32)
    result = _metrics(reference, candidate)
    assert result.sqnr_db == pytest.approx(20.0, abs=1e-4)
    # sum r c = 4n (the noise cancels), sum c^2 = 4.04n
    assert result.cosine == pytest.approx(2.0 / math.sqrt(4.04), abs=1e-6)
    assert result.max_abs_error == pytest.approx(0.2, abs=1e-6)
    assert result.mean_abs_error == pytest.approx(0.2, abs=1e-6)
    assert result.relative_error == pytest.approx(0.1, abs=1e-6)


def test_streaming_in_batches_gives_the_same_numbers():
    rng = np.random.default_rng(1)
    reference = rng.standard_normal((12, 7))
    candidate = reference + 0.05 * rng.standard_normal((12, 7))
    whole = _metrics(reference, candidate)
    streamed = _metrics(reference, candidate, batches=5)
    for field in ("sqnr_db", "cosine", "mean_abs_error", "relative_error", "top5_overlap"):
        assert getattr(streamed, field) == pytest.approx(getattr(whole, field), rel=1e-12)
    assert streamed.max_abs_error == whole.max_abs_error
    assert streamed.top1_agreement == whole.top1_agreement


def test_a_known_permutation_gives_known_top1_agreement_and_top5_overlap():
    # Four rows of scores 0..9. Row 0 is rolled by one class: its top class 9 moves to
    # index 0, and its top five {5..9} become {0, 6, 7, 8, 9}: 4 of 5 shared.
    reference = np.tile(np.arange(10, dtype=np.float32), (4, 1))
    candidate = reference.copy()
    candidate[0] = np.roll(reference[0], 1)
    result = _metrics(reference, candidate)
    assert result.top1_agreement == pytest.approx(3 / 4)
    assert result.top5_overlap == pytest.approx((4 / 5 + 1 + 1 + 1) / 4)


def test_reversed_classes_share_no_top1_and_no_top5():
    reference = np.tile(np.arange(10, dtype=np.float32), (3, 1))
    result = _metrics(reference, reference[:, ::-1].copy())
    assert result.top1_agreement == 0.0
    assert result.top5_overlap == 0.0


def test_top_k_uses_all_classes_when_fewer_than_five():
    reference = np.array([[0.1, 0.9, 0.3]])
    assert top_k_overlap(reference, reference[:, ::-1]).tolist() == [1.0]


def test_non_classifier_outputs_have_no_top1():
    result = _metrics(np.ones((4, 1), np.float32), np.ones((4, 1), np.float32))
    assert result.top1_agreement is None and result.top5_overlap is None


def test_non_finite_values_are_counted():
    reference = np.array([[1.0, 2.0, 3.0]], np.float32)
    candidate = np.array([[1.0, np.nan, np.inf]], np.float32)
    result = _metrics(reference, candidate)
    assert result.nonfinite_reference == 0
    assert result.nonfinite_candidate == 2
    assert math.isnan(result.sqnr_db)


def test_edge_cases_of_the_formulas():
    assert sqnr_db(0.0, 0.0) == math.inf
    assert sqnr_db(0.0, 1.0) == -math.inf
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)
    assert cosine(0.0, 0.0, 0.0) == 1.0
    assert cosine(0.0, 1.0, 0.0) == 0.0
    assert cosine(-2.0, 1.0, 4.0) == pytest.approx(-1.0)
    assert relative_error(0.0, 0.0) == 0.0
    assert relative_error(0.0, 1.0) == math.inf
    assert relative_error(4.0, 1.0) == pytest.approx(0.5)
