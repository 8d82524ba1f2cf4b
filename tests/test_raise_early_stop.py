"""A candidate raise is scored only while it can still improve on the kept steps.

The raise phase scores each candidate raised alone against the kept steps' score
(`HeldOut.score(..., against=...)`): once it has lost on so many held-out samples that it
can no longer win on enough of them (`can_still_hold`, the sign test of
`Fidelity.holds_on_samples`), it cannot improve on them and the samples left are not run.
"""

from __future__ import annotations

import numpy as np
from test_class_shift import _classifier

from qconvert.pipelines.held_out import HeldOut
from qconvert.recipe_fidelity import can_still_hold, wins_needed


def test_the_sign_test_is_given_up_only_when_no_remaining_samples_could_pass_it():
    # 16 samples need 13 wins (15 untied: 12; 14 untied: 11).
    assert wins_needed(16) == 13 and wins_needed(15) == 12
    assert can_still_hold(0, 3, 13)  # all 13 left won: 13 of 16
    assert not can_still_hold(0, 4, 12)  # 12 of 16, or 11 of 15 with a tie, ...
    assert can_still_hold(12, 3, 1)  # a win (13 of 16) or a tie (12 of 15)
    assert not can_still_hold(11, 4, 1)


def test_a_score_against_a_better_model_stops_once_it_cannot_improve_on_it():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((2, 8))
    samples = [{"input": rng.standard_normal((1, 8)).astype(np.float32)} for _ in range(16)]
    scorer = HeldOut(_classifier(w, np.zeros(2)), samples)
    noise = rng.standard_normal((2, 8))
    good = _classifier(w + 0.05 * noise, np.zeros(2))
    poor = _classifier(w + 0.30 * noise, np.zeros(2))
    base = scorer.score(poor)
    better = scorer.score(good)
    assert better.improves(base)
    # Against the poor model the good one runs to the end and scores the same ...
    assert scorer.score(good, against=base) == better
    # ... and against the good one the poor one gives up: it cannot improve on it.
    assert scorer.score(poor, against=better) is None
