"""The recipe's raise phase: the nodes that buy the most held-out fidelity per cost.

Once the recipe's steps are decided (`pipelines.recipe`), and while the held-out fidelity
is below the floor, nodes are raised: scored raised alone on top of the kept steps,
ranked by the dB each gains per share of the model's work and weight bytes it moves to
float (`raise_costs`), and raised in that order while the budget allows and each raise
still improves the held-out score (`raise_nodes`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx_ir as ir

from qconvert.pipelines.raise_costs import raise_cost, weight_shares, work_shares
from qconvert.plan import QuantPlan
from qconvert.recipe_fidelity import MIN_RAISE_GAIN_DB, Fidelity, verdict_detail
from qconvert.recipe_result import RaisedNode, RaiseSearch, RecipeOptions, raise_kind
from qconvert.sensitivity import quantizable_nodes

Raise = tuple[str, bool]
"""A raised node: its name, and whether its weights are stored float too."""


MAX_RANKED = 16
"""Nodes scored for raising at most (the cheapest that fit the budget): a 224x224
inverted-residual CNN has over 60 quantized nodes, and scoring each costs a session and 16
runs."""

MAX_GAIN_DB = 60.0
"""A node's gain counts as at most this (keeping the only noisy node float gives inf)."""


@dataclass(frozen=True, slots=True)
class _Candidate:
    name: str
    op_type: str
    float_weights: bool
    gain_db: float
    work_share: float
    weight_share: float
    made_float: tuple[str, ...]


def raise_nodes(build, rebuild, kept, scoring, best, options, progress, work):
    """Raises the nodes that buy the most held-out fidelity per cost, within budget.

    A node is raised first as float compute on int8-stored weights: that costs no file
    bytes, only the multiply-accumulates it (and whatever the plan makes float with it,
    `raise_costs`) moves to float kernels, as a share of the model's (`work`). Where the
    error is in the node's weights themselves (an outlier input channel sets a whole
    output channel's scale), only float weights help: a node whose weights fit the
    budget is scored that way too, at the cost of its weights' share of the weight
    bytes. Each variant is scored alone on the kept steps (`rebuild`: the plan, then the
    weight passes, not cached: one state a candidate), so its gain is what is left once
    rounding and bias correction have removed what they can: on a 224x224
    depthwise-separable CNN (ReLU6, explicit Pads) the first depthwise Conv costs 5 dB
    before bias correction and nothing after, while the stem Conv (the image input
    quantized, and its weights) still costs 2.6 dB.
    Candidates are raised best gain per (work share + byte share) first.

    `scoring`: `score(candidate, against=None)`, and `score_each(items, against)`, which
    scores each (key, candidate) pair's candidate against `against`, in order.
    """
    planned, weigh = rebuild
    score, score_each = scoring
    search_start = best
    current = build(kept)
    nodes = quantizable_nodes(current.plan)
    names = [name for name, _ in nodes]
    own = work_shares(work, names)
    stored = weight_shares(current.prepared, names)
    # A node whose own work is over the budget can never be raised: not scored. Of the
    # rest, `MAX_RANKED` are scored (each score is a session and a pass over the
    # held-out samples): the model's first and last layers, then the cheapest.
    affordable = [(n, op) for n, op in nodes if own[n] <= options.budget]
    quantized, nodes = len(nodes), ranked_candidates(current.prepared, affordable, own)
    candidates = []
    best_alone: tuple[str, float] | None = None
    # Each variant's score alone: raised first, it is the very model scored here again.
    alone_scores: dict[frozenset[Raise], Fidelity] = {}

    def variants(advance):
        """Each variant to score, built: (its candidate, as far as known), its state."""
        for name, op_type in nodes:
            for float_weights in (False, True):
                weight_share = stored[name] if float_weights else 0.0
                if float_weights and not 0.0 < weight_share <= options.budget:
                    continue
                alone = planned(kept, frozenset({(name, float_weights)}))
                cost = raise_cost(current.plan, alone.plan, work)
                if cost.work_share > options.budget:
                    break  # known from the plan: the weight passes are not run for it
                candidate = _Candidate(
                    name=name,
                    op_type=op_type,
                    float_weights=float_weights,
                    gain_db=0.0,
                    work_share=cost.work_share,
                    weight_share=weight_share,
                    made_float=tuple(n for n in cost.made_float if n != name),
                )
                yield candidate, weigh(kept, alone)
            advance()

    with progress.task("Ranking nodes", len(nodes)) as advance:
        # Not run past the sample where it can no longer win on enough of them: a raise
        # that alone does not improve on the kept steps is no candidate. Scored while
        # the next variant is built (`score_each`), in the same order.
        for candidate, fidelity in score_each(variants(advance), best):
            if fidelity is None:
                continue
            variant = frozenset({(candidate.name, candidate.float_weights)})
            alone_scores[variant] = fidelity
            gain = min(fidelity.gain_db(best), MAX_GAIN_DB)
            if best_alone is None or gain > best_alone[1]:
                best_alone = (candidate.name, gain)
            floor = options.min_top1_agreement
            if gain >= MIN_RAISE_GAIN_DB and fidelity.improves(best, top1_floor=floor):
                candidates.append(dataclasses.replace(candidate, gain_db=gain))
    candidates.sort(
        key=lambda c: (-c.gain_db / max(c.work_share + c.weight_share, 1e-9), c.name)
    )
    raises: frozenset[Raise] = frozenset()
    raised = []
    rejected = []
    used_weights = 0.0
    for candidate in candidates:
        if best.meets(options):
            break
        if any(name == candidate.name for name, _ in raises):
            continue
        weights = ", float weights" if candidate.float_weights else ""
        label = f"{candidate.name} ({candidate.gain_db:+.1f} dB alone{weights})"
        if used_weights + candidate.weight_share > options.budget:
            rejected.append(f"{label}: its float weights would pass the budget")
            continue
        chosen = raises | {(candidate.name, candidate.float_weights)}
        after = alone_scores.get(chosen)  # its cost was within the budget too
        if after is None:
            trial = planned(kept, chosen)
            if raise_cost(current.plan, trial.plan, work).work_share > options.budget:
                rejected.append(f"{label}: with the nodes raised before, over the budget")
                continue
            after = score(build(kept, chosen, trial))
        refusal = _refusal(after, best, options)
        if refusal:
            rejected.append(f"{label}: {refusal}")
            continue
        raises, best = chosen, after
        used_weights += candidate.weight_share
        raised.append(
            RaisedNode(
                name=candidate.name,
                op_type=candidate.op_type,
                gain_db=candidate.gain_db,
                work_share=candidate.work_share,
                weight_share=candidate.weight_share,
                made_float=candidate.made_float,
            )
        )
    # A raised layer reads its input float only back to the layer that writes it, whose
    # output is still rounded (and re-read in float). Raising that layer too removes the
    # rounding, but alone it gains nothing, its output being rounded for the int8 layer
    # after it: so it is tried on top, walking back while each one helps.
    frontier = [node.name for node in raised]
    while frontier and not best.meets(options):
        feeder = feeding_layer(current.prepared, frontier.pop(0))
        if (
            feeder is None
            or feeder not in own
            or any(name == feeder for name, _ in raises)
            # Already float with a raised node (the float-reader rule): the same model.
            or any(feeder in node.made_float for node in raised)
        ):
            continue
        label = f"{feeder} (the layer writing a raised layer's input)"
        chosen = raises | {(feeder, False)}
        trial = planned(kept, chosen)
        cost = raise_cost(current.plan, trial.plan, work)
        if cost.work_share > options.budget:
            rejected.append(f"{label}: with the nodes raised before, over the budget")
            continue
        after = score(build(kept, chosen, trial))
        refusal = _refusal(after, best, options)
        if refusal:
            rejected.append(f"{label}: {refusal}")
            continue
        variant = frozenset({(feeder, False)})
        variant_trial = planned(kept, variant)
        if variant not in alone_scores:
            alone_scores[variant] = score(weigh(kept, variant_trial))
        alone = raise_cost(current.plan, variant_trial.plan, work)
        raises, best = chosen, after
        raised.append(
            RaisedNode(
                name=feeder,
                op_type=_op_type(current.prepared, feeder),
                gain_db=min(alone_scores[variant].gain_db(search_start), MAX_GAIN_DB),
                work_share=alone.work_share,
                made_float=tuple(n for n in alone.made_float if n != feeder),
            )
        )
        frontier.append(feeder)
    search = RaiseSearch(
        quantized=quantized,
        affordable=len(affordable),
        scored=len(nodes),
        gaining=len(candidates),
        best_alone=best_alone,
        rejected=tuple(rejected),
        floor_met=best.meets(options),
    )
    return raises, tuple(raised), best, search


def _refusal(after: Fidelity, best: Fidelity, options: RecipeOptions) -> str | None:
    """Why a raise scored `after` on top of `best` is refused, or None to keep it."""
    if not after.improves(best, top1_floor=options.min_top1_agreement):
        return _no_gain(after, best, options.min_top1_agreement)
    if after.leans_more(best):
        return after.lean_detail(best)
    return None


def _no_gain(after: Fidelity, best: Fidelity, top1_floor: float) -> str:
    """Why a raise that gained alone did not improve the score with the kept raises."""
    detail = verdict_detail(after, best, top1_floor=top1_floor)
    if after.pooled_better(best) and detail:
        return detail
    return f"{after.gain_db(best):+.1f} dB on top of the nodes raised before"


LAYER_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
"""The ops whose nodes count as a model's layers (first and last)."""

_FEEDER_DEPTH = 4
"""How many ops without weights (an activation's Sigmoid and Mul, a Split) may lie between
a layer and the layer that writes its input."""


def feeding_layer(model: ir.Model, name: str) -> str | None:
    """The layer that writes node `name`'s first input, or None (none, or several).

    Its output reaches that input through ops without weights (at most `_FEEDER_DEPTH`
    of them: SiLU's Sigmoid and Mul, a Split, a Relu).
    """
    node = next((n for n in model.graph if n.name == name), None)
    if node is None or not node.inputs or node.inputs[0] is None:
        return None
    found: set[str] = set()
    frontier, seen = [node.inputs[0]], set()
    for _ in range(_FEEDER_DEPTH + 1):
        step = []
        for value in frontier:
            producer = value.producer() if value is not None else None
            if producer is None or producer.name in seen:
                continue
            seen.add(producer.name)
            if producer.op_type in LAYER_OPS:
                found.add(producer.name or "")
            else:
                step.extend(v for v in producer.inputs if v is not None and not v.const_value)
        frontier = step
    return found.pop() if len(found) == 1 else None


def _op_type(model: ir.Model, name: str) -> str:
    return next((n.op_type for n in model.graph if n.name == name), "")


EARLY_LAYERS = 3
"""Layers after the first that are scored for raising too, beyond `MAX_RANKED`."""


def ranked_candidates(
    model: ir.Model, nodes: Sequence[tuple[str, str]], costs: Mapping[str, float]
) -> list[tuple[str, str]]:
    """The `MAX_RANKED` nodes the raise step scores, of `nodes` (name, op type).

    The first and last layers (`LAYER_OPS`) in graph order come first: the first reads
    the model's input, whose quantization no earlier layer can average out, and the
    last writes the output the score is taken on; both are known to be the most
    sensitive layers of a network, and a stem Conv is rarely among the cheapest (2.8% of
    a 224x224 depthwise-separable CNN's multiply-accumulates, more than 40 of its other
    nodes). The rest are the cheapest, as gain per cost favours them; then the
    `EARLY_LAYERS` layers after the first, if not already in.
    """
    order = {node.name: index for index, node in enumerate(model.graph)}
    layers = sorted(
        (node for node in nodes if node[1] in LAYER_OPS), key=lambda n: order.get(n[0], 0)
    )
    ends = list(dict.fromkeys(layers[:1] + layers[-1:]))
    rest = sorted(
        (node for node in nodes if node not in ends),
        key=lambda node: (costs[node[0]], node[0]),
    )
    ranked = (ends + rest)[:MAX_RANKED]
    # And the next EARLY_LAYERS layers, beyond MAX_RANKED: raised, a layer keeps the
    # tensor it reads float, and an early layer's input error passes through every later
    # layer (a 320x320 SiLU detector's third Conv reads the SiLU output of its second,
    # [-0.28, 206] on one uint8 grid, median 0: float, its class logits gain 6 dB on
    # held-out photos for 0.6% of the work). None of them is among the cheapest there.
    early = [node for node in layers[1 : 1 + EARLY_LAYERS] if node not in ranked]
    return ranked + early


def with_raised_reasons(plan: QuantPlan, raised: tuple[RaisedNode, ...]) -> QuantPlan:
    """`plan` with each raised node's reason saying what it gained and why it was picked."""
    by_name = {node.name: node for node in raised}
    nodes = tuple(
        dataclasses.replace(
            node,
            reason=f"raised by the recipe ({raise_kind(by_name[node.name])}): "
            f"+{by_name[node.name].gain_db:.1f} dB held-out alone, the most per "
            "multiply-accumulate and byte it moves to float",
        )
        if node.name in by_name
        else node
        for node in plan.nodes
    )
    return dataclasses.replace(plan, nodes=nodes)
