"""The recipe's candidates scored on the held-out samples.

One at a time, or each beside the next candidate's build.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from qconvert.class_outputs import class_score_outputs
from qconvert.handed_weights import serialized
from qconvert.memory import release_dropped
from qconvert.output_parts import concat_parts
from qconvert.pipelines.held_out import HeldOut
from qconvert.pipelines.state import QuantizeState
from qconvert.recipe_fidelity import Fidelity
from qconvert.sensitivity import fits_side_by_side

T = TypeVar("T")


class CandidateScorer:
    """Scores candidate states against the float model on the held-out samples."""

    def __init__(
        self, state: QuantizeState, rewrite: Callable[[QuantizeState], QuantizeState]
    ) -> None:
        graph, weights = serialized(state.prepared)
        self.held_out = HeldOut(
            graph,
            [s.feeds for s in state.held_out],
            concat_parts(state.prepared),
            weights=weights,
            classifiers=class_score_outputs(state.prepared),
        )
        self._rewrite = rewrite
        self._side_by_side = fits_side_by_side(state.prepared)

    def score(
        self, candidate: QuantizeState, against: Fidelity | None = None
    ) -> Fidelity | None:
        """`candidate`'s fidelity; None once it cannot improve on `against` (if given)."""
        graph, weights = serialized(self._rewrite(candidate).converted)
        release_dropped()  # the trial's clones: its session comes on top of what is alive
        return self.held_out.score(graph, weights, against=against)

    def score_each(
        self, items: Iterable[tuple[T, QuantizeState]], against: Fidelity
    ) -> Iterator[tuple[T, Fidelity | None]]:
        """`score(candidate, against)` of each item's candidate, in order, with its key.

        Each candidate is scored on a thread of its own while the next one is built
        (planned, weighed, rewritten: Python, one core) in this one: onnxruntime lets go
        of the GIL while it builds a session and runs it. The items are drawn one at a
        time, so at most two converted candidates are alive. The session has the cores
        `score`'s has (the same outputs); its idle threads do not spin, which would take
        the core the next candidate is built on. Past `SIDE_BY_SIDE_BYTES` of weights
        the candidates are scored one after the other, as `score` does: a second
        candidate and its session alive took a 90 MB sentence encoder's run from 467 to
        584 MB.
        """
        if not self._side_by_side:
            for key, candidate in items:
                yield key, self.score(candidate, against)
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            for key, candidate in items:
                graph, weights = serialized(self._rewrite(candidate).converted)
                del candidate
                release_dropped()
                job = pool.submit(
                    self.held_out.score, graph, weights, against=against, spin=False
                )
                del graph, weights
                if pending is not None:
                    yield pending[0], pending[1].result()
                pending = (key, job)
            if pending is not None:
                yield pending[0], pending[1].result()
