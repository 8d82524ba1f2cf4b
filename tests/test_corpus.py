"""A fixed sample of the ONNX node-test corpus, through every scheme (`make corpus`: all).

Every case must end ok, refused (exit 3, one line) or caught (exit 4, one line): never an
internal error, a traceback, or a written model that fails to run or drifts past the
scheme's bound (`tools/corpus.py`).
"""

from __future__ import annotations

from tools import corpus

SAMPLE = 40
"""Cases spread evenly over the sorted corpus: about 30 s on two cores, for 200 runs."""


def test_corpus_sample_ends_ok_refused_or_caught():
    cases = corpus.sample(corpus.collect(), SAMPLE)
    assert len(cases) == SAMPLE
    outcomes = corpus.run(cases, corpus.SCHEMES, jobs=1)
    bad = [o for o in outcomes if o.status not in ("ok", "refused", "usage", "caught")]
    assert not bad, (
        corpus.table(bad)
        + "\n"
        + "\n".join(f"{o.case} {o.scheme}: {o.reason} {o.detail[-300:]}" for o in bad)
    )
    eligible = [o for o in outcomes if o.eligible]
    assert eligible and sum(o.status == "ok" for o in eligible) >= 0.95 * len(eligible)
