"""Per-node sensitivity to quantization, and mixed precision chosen from it.

Sensitivity of node n: the output SQNR of the model in which n alone is quantized (its
activations, weights and bias; every other quantizable node excluded, so float), over a
few evaluation samples. The lower that SQNR, the more n costs. All variants share one
calibration and one prepared model: each is `make_plan(excluded=...)` plus the Q/DQ
rewrite of a clone, and the float reference outputs are computed once. Noise from
independent nodes adds up roughly as energies, so the ranking also tells which nodes
keeping float recovers the most.

Mixed precision (`choose_float_nodes`) is greedy on that ranking: starting from the fully
quantized model, keep the most sensitive remaining node float until the target holds
(output SQNR at least `target_sqnr_db`, and/or top-1 accuracy drop at most
`max_top1_drop` points). Greedy is not optimal, but each step is one evaluation, and a
model rarely needs more than a handful of float nodes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from qconvert import ops
from qconvert.cpu import usable_cores
from qconvert.dataset import Feeds
from qconvert.handed_weights import serialized
from qconvert.latency import LatencyConfig, measure_latency
from qconvert.metrics import OutputAccumulator, sqnr_db
from qconvert.passes import InsertQDQPass
from qconvert.plan import QuantPlan
from qconvert.runtime import make_session

if TYPE_CHECKING:
    import onnxruntime as ort

SIDE_BY_SIDE_BYTES = 32 << 20
"""Most bytes of weights whose plans `Evaluator.score_each` scores side by side: the
second session it holds costs about the weights' size again at most."""

LATENCY_RUNS = 30
"""Timed runs behind the latency the mixed-precision note reports."""

PlanFor = Callable[[frozenset[str]], QuantPlan]
"""Plans the model with the given nodes kept float."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeSensitivity:
    """What quantizing one node alone costs."""

    name: str
    op_type: str
    sqnr_db: float
    """Output SQNR (the worst output) with this node alone quantized."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Score:
    """How close one variant's outputs are to the float model's."""

    sqnr_db: float
    """The worst output's SQNR."""
    top1_drop_points: float | None
    """Float top-1 accuracy minus the variant's, in points (None without labels)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BoundedScore:
    """A variant's worst-output SQNR, or a bound on it (`Evaluator.score_unless_below`)."""

    sqnr_db: float
    """The SQNR when `exact`, else the most the remaining samples could leave it at."""
    samples: int
    """The samples run."""
    exact: bool
    """Whether every sample ran."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """What mixed precision must reach; None leaves a criterion out."""

    sqnr_db: float | None = None
    max_top1_drop: float | None = None

    def holds(self, score: Score) -> bool:
        """Whether `score` meets every criterion set."""
        if self.sqnr_db is not None and not score.sqnr_db >= self.sqnr_db:
            return False
        if self.max_top1_drop is not None and score.top1_drop_points is not None:
            return score.top1_drop_points <= self.max_top1_drop
        return True


@dataclass(frozen=True, slots=True, kw_only=True)
class MixedPrecision:
    """The nodes kept float to reach a target, and the score before and after."""

    target: Target
    kept_float: tuple[NodeSensitivity, ...]
    before: Score
    after: Score
    reached: bool
    latency_ms: tuple[float, float] | None = None
    """Median 1-thread latency of the fully quantized and the mixed model, when any node
    was kept float."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FloatOutputs:
    """The float model's outputs on some samples, run already (by calibration)."""

    sources: tuple[str, ...]
    """Where each sample came from (`DirectorySource.sources`), in order."""
    names: tuple[str, ...]
    runs: tuple[list[np.ndarray], ...]
    """Per sample, its outputs in the order of `names`."""


class Evaluator:
    """Scores plan variants of one prepared model against the float model's outputs."""

    def __init__(
        self,
        float_model: bytes | str | None,
        prepared: ir.Model,
        samples: Sequence[Feeds],
        labels: np.ndarray | None = None,
        weights: Mapping[str, np.ndarray] | None = None,
        reference: FloatOutputs | None = None,
    ) -> None:
        """`weights`: the large initializers `float_model` was serialized without.

        `reference`: the float model's outputs on `samples`, when they were run already;
        then `float_model` is not run (and may be None).
        """
        self.prepared = prepared
        self.samples = list(samples)
        self.labels = labels
        if reference is not None:
            self.output_names = list(reference.names)
            self.reference = list(reference.runs)
        else:
            # Scores only (`runtime.NCHWC_TRANSFORMER`), as the candidates' sessions.
            session = make_session(
                float_model, quiet=True, weights=weights, reorder_layout=False
            )
            self.output_names = [o.name for o in session.get_outputs()]
            self.reference = [session.run(None, feeds) for feeds in self.samples]
        self.reference_accuracy = self._accuracy(self.reference)

    def latency_ms(self, plan: QuantPlan) -> float:
        """Median latency of the model `plan` quantizes, 1 thread, on the first sample."""
        # timed as a user's session runs it, blocked layout and all
        session = self._session(plan, threads=1, reorder_layout=True)
        config = LatencyConfig(runs=LATENCY_RUNS, warmup=3, threads=1)
        return measure_latency(session, self.samples[0], config).median_ms

    def _session(
        self,
        plan: QuantPlan,
        threads: int = 0,
        spin: bool = True,
        *,
        reorder_layout: bool = False,
    ) -> ort.InferenceSession:
        """A session of the model `plan` quantizes, its weights handed over as arrays.

        Without the blocked layout by default: it scores, against a reference made so.
        """
        converted = InsertQDQPass(plan=plan)(self.prepared.clone()).model
        graph, weights = serialized(converted)
        del converted
        return make_session(
            graph,
            threads=threads,
            spin=spin,
            quiet=True,
            weights=weights,
            reorder_layout=reorder_layout,
        )

    def _run(self, session: ort.InferenceSession) -> list[list[np.ndarray]]:
        return [session.run(self.output_names, feeds) for feeds in self.samples]

    def score(self, plan: QuantPlan) -> Score:
        """The outputs of the model `plan` quantizes, against the float ones."""
        return self._scored(self._run(self._session(plan)))

    def score_each(self, plans: Sequence[QuantPlan]) -> list[Score]:
        """`score` of each plan, their sessions running side by side.

        Each plan's session gets an equal share of the cores (one each on two cores), and
        runs its samples on a thread of its own while the next plan's model is built:
        onnxruntime lets go of the GIL while it runs. On 2 cores two one-thread sessions
        run the samples of `auto`'s check in 0.36 s of CPU where one two-thread session
        after the other took 0.54 s (a 224x224 depthwise-separable CNN, 2 x 16 samples),
        and the second model is built while the first runs. Threads that wait for work do
        not spin: they would take the cores the other session computes on. The outputs are
        those of `score`'s sessions where the share is the cores onnxruntime takes by
        default (one per physical core); with fewer threads a float kernel's last bits may
        differ (MLAS cuts a GEMM into blocks by thread), as they already do from one
        machine to another.

        Two sessions alive at once hold a second copy of the quantized weights and an
        arena: on a 90 MB sentence encoder the run's peak went from 436 to 513 MB (on
        that CNN, 18 MB of weights, 203 to 213 MB). Past `SIDE_BY_SIDE_BYTES`
        of weights the plans are scored one after the other, as `score` does.
        """
        if not self.scores_side_by_side():
            return [self.score(plan) for plan in plans]
        share = max(1, usable_cores() // max(1, len(plans)))
        with ThreadPoolExecutor(max_workers=max(1, len(plans))) as pool:
            running = [
                pool.submit(self._run, self._session(plan, threads=share, spin=False))
                for plan in plans
            ]
            return [self._scored(run.result()) for run in running]

    def scores_side_by_side(self) -> bool:
        """Whether `score_each` runs its plans at once: weights within `SIDE_BY_SIDE_BYTES`."""
        return fits_side_by_side(self.prepared)

    def score_unless_below(self, plan: QuantPlan, floor_db: float) -> BoundedScore:
        """`score` of `plan`, run sample by sample until its SQNR cannot reach `floor_db`.

        A sample's error only adds noise energy to each output, while the signal energy
        over all the samples is known from the float outputs. So after some samples each
        output's SQNR is at most its signal energy over the noise so far, and the worst
        output's at most the least of those. Once that bound falls below `floor_db` the
        full score would too, and the rest of the samples are not run. The sums are
        those `OutputAccumulator` makes, in its order: non-negative terms added in
        floating point never make a sum smaller, so the bound holds on the computed
        score as well.
        """
        signal = [0.0] * len(self.output_names)
        for reference in self.reference:
            for index, array in enumerate(reference):
                flat = np.asarray(array, dtype=np.float64).reshape(-1)
                signal[index] += float(np.einsum("i,i->", flat, flat))
        session = self._session(plan)
        accumulators = [OutputAccumulator(name, classify=False) for name in self.output_names]
        for count, (feeds, reference) in enumerate(
            zip(self.samples, self.reference, strict=True), start=1
        ):
            outputs = session.run(self.output_names, feeds)
            for accumulator, expected, actual in zip(
                accumulators, reference, outputs, strict=True
            ):
                accumulator.update(expected, actual)
            if count == len(self.samples):
                break
            bound = min(
                (
                    sqnr_db(total, accumulator.noise)
                    for total, accumulator in zip(signal, accumulators, strict=True)
                ),
                default=math.inf,
            )
            if bound < floor_db:
                return BoundedScore(sqnr_db=bound, samples=count, exact=False)
        worst = math.inf  # as `_scored` takes the least, NaN and all
        for accumulator in accumulators:
            worst = min(worst, accumulator.result().sqnr_db)
        return BoundedScore(sqnr_db=worst, samples=len(self.samples), exact=True)

    def _scored(self, outputs: list[list[np.ndarray]]) -> Score:
        """The score of a variant's outputs on the samples, against the float ones."""
        worst = math.inf
        for index, name in enumerate(self.output_names):
            accumulator = OutputAccumulator(name, classify=False)
            for reference, candidate in zip(self.reference, outputs, strict=True):
                accumulator.update(reference[index], candidate[index])
            worst = min(worst, accumulator.result().sqnr_db)
        drop = None
        if self.reference_accuracy is not None:
            drop = 100.0 * (self.reference_accuracy - self._accuracy(outputs))
        return Score(sqnr_db=worst, top1_drop_points=drop)

    def _accuracy(self, outputs: list[list[np.ndarray]]) -> float | None:
        if self.labels is None:
            return None
        predictions = np.array([int(np.argmax(run[0])) for run in outputs])
        return float(np.mean(predictions == self.labels[: len(predictions)]))


def fits_side_by_side(model: ir.Model) -> bool:
    """Whether its weights are within `SIDE_BY_SIDE_BYTES`.

    Two quantized copies of such a model, each with a session, may be alive at once.
    """
    return _weight_bytes(model) <= SIDE_BY_SIDE_BYTES


def _weight_bytes(model: ir.Model) -> int:
    """The bytes of the model's initializers held in memory."""
    return sum(
        value.const_value.nbytes
        for value in model.graph.initializers.values()
        if value.const_value is not None
    )


def quantizable_nodes(plan: QuantPlan) -> list[tuple[str, str]]:
    """(name, op type) of the nodes the plan runs on integer kernels (not pass-throughs)."""
    return [
        (node.name, node.op_type)
        for node in plan.quantized_nodes()
        if node.op_type in ops.QUANTIZED
    ]


def rank_nodes(
    plan_for: PlanFor,
    evaluator: Evaluator,
    *,
    on_node: Callable[[], None] = lambda: None,
) -> tuple[NodeSensitivity, ...]:
    """Every quantizable node with the SQNR of quantizing it alone, most sensitive first."""
    nodes = quantizable_nodes(plan_for(frozenset()))
    names = frozenset(name for name, _ in nodes)
    ranked = []
    for name, op_type in nodes:
        score = evaluator.score(plan_for(names - {name}))
        ranked.append(NodeSensitivity(name=name, op_type=op_type, sqnr_db=score.sqnr_db))
        on_node()
    return tuple(sorted(ranked, key=lambda n: (n.sqnr_db, n.name)))


def choose_float_nodes(
    plan_for: PlanFor,
    evaluator: Evaluator,
    target: Target,
    *,
    on_node: Callable[[], None] = lambda: None,
) -> tuple[QuantPlan, MixedPrecision]:
    """The plan keeping the fewest most-sensitive nodes float that meets `target`."""
    full = plan = plan_for(frozenset())
    before = evaluator.score(plan)
    after, kept = before, []
    if not target.holds(before):
        for node in rank_nodes(plan_for, evaluator, on_node=on_node):
            kept.append(node)
            plan = plan_for(frozenset(n.name for n in kept))
            after = evaluator.score(plan)
            if target.holds(after):
                break
    latency = None
    if kept:
        latency = (evaluator.latency_ms(full), evaluator.latency_ms(plan))
    return plan, MixedPrecision(
        target=target,
        kept_float=tuple(kept),
        before=before,
        after=after,
        reached=target.holds(after),
        latency_ms=latency,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Analysis:
    """The result of `qconvert analyze`."""

    model: str
    samples: int
    full_sqnr_db: float
    """Output SQNR with every quantizable node quantized."""
    nodes: tuple[NodeSensitivity, ...]
    seconds: float

    def to_dict(self) -> dict:
        """The analysis as JSON-ready data (NaN and infinities as strings)."""

        def number(x: float) -> float | str | None:
            if math.isnan(x):
                return None
            return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")

        return {
            "command": "analyze",
            "model": self.model,
            "samples": self.samples,
            "full_sqnr_db": number(self.full_sqnr_db),
            "seconds": self.seconds,
            "nodes": [
                {"name": n.name, "op_type": n.op_type, "sqnr_db": number(n.sqnr_db)}
                for n in self.nodes
            ],
        }


def analyze(
    model: str, plan_for: PlanFor, evaluator: Evaluator, on_node: Callable[[], None]
) -> Analysis:
    """Ranks every quantizable node; see the module docstring."""
    start = time.perf_counter()
    full = evaluator.score(plan_for(frozenset()))
    nodes = rank_nodes(plan_for, evaluator, on_node=on_node)
    return Analysis(
        model=model,
        samples=len(evaluator.samples),
        full_sqnr_db=full.sqnr_db,
        nodes=nodes,
        seconds=round(time.perf_counter() - start, 3),
    )
