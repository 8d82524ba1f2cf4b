"""Mixed precision: keep float the fewest, most sensitive nodes until a target holds."""

from __future__ import annotations

import dataclasses
import itertools

import onnx_ir as ir

from qconvert.compare import (
    folder_labels,
    load_labels,
)
from qconvert.config import Format, QuantizeConfig
from qconvert.dataset import (
    DirectorySource,
)
from qconvert.errors import (
    ConfigError,
)
from qconvert.handed_weights import serialized
from qconvert.plan import QuantPlan, make_plan
from qconvert.sensitivity import (
    Evaluator,
    FloatOutputs,
    MixedPrecision,
    Score,
    Target,
    choose_float_nodes,
)


def check_mixed_precision(config: QuantizeConfig, target: Target, data, eval_data) -> None:
    """Refuses a mixed-precision target the scheme, format or data cannot serve."""
    if config.scheme not in ("int8", "16x8") or config.format is not Format.QDQ:
        raise ConfigError(
            f"--target-sqnr/--max-top1-drop do not go with --scheme {config.scheme} "
            f"--format {config.format.value}.",
            hint="mixed precision keeps nodes of a static QDQ model float: use --scheme "
            "int8 or 16x8 with --format qdq.",
        )
    if target.max_top1_drop is not None and eval_data is None:
        raise ConfigError(
            "--max-top1-drop needs --eval DIR with labels.npy.",
            hint="or use --target-sqnr DB, which needs no labels.",
        )
    if eval_data is not None and target.max_top1_drop is not None:
        if folder_labels(eval_data) is None:
            raise ConfigError(
                f"--max-top1-drop needs labels: '{eval_data}' has no labels.npy.",
                hint="put labels.npy (one integer per sample) in the --eval folder.",
            )
    if data is None and eval_data is None:
        raise ConfigError(
            "--target-sqnr needs samples to measure on: pass --eval DIR or --data DIR.",
            hint="with --calib, add --eval DIR.",
        )


MIXED_PRECISION_SAMPLES = 32
"""Samples each mixed-precision evaluation runs: enough for a stable SQNR, few enough to
score dozens of variants in seconds."""


def planner(prepared, scheme, config, selection, ranges):
    """A function from the set of nodes kept float to the plan of everything else."""

    def plan_for(excluded: frozenset[str]) -> QuantPlan:
        return make_plan(
            prepared,
            scheme,
            ranges,
            excluded=excluded,
            selection=selection,
            overrides=config.overrides,
            format=config.format.value,
        )

    return plan_for


def evaluator_on(
    prepared: ir.Model,
    source: DirectorySource,
    samples: int,
    reference: FloatOutputs | None = None,
) -> Evaluator:
    """Scores variants on the first `samples` samples of `source` (and their labels).

    The reference is the prepared float model: the same function as the model given, and one
    onnxruntime always loads (preparing fixed duplicate or empty node names, for one).
    `reference`: its outputs, run already (by calibration); taken when they are those of
    these samples and of the prepared model's outputs, else the float model runs here.
    """
    chosen = [sample.feeds for sample in itertools.islice(source, samples)]
    labels_path = folder_labels(source.folder)
    labels = load_labels(labels_path, len(source))[: len(chosen)] if labels_path else None
    names = tuple(value.name for value in prepared.graph.outputs)
    if (
        reference is not None
        and reference.sources == source.sources()[: len(chosen)]
        and reference.names == names
    ):
        return Evaluator(None, prepared, chosen, labels=labels, reference=reference)
    graph, weights = serialized(prepared)
    return Evaluator(graph, prepared, chosen, labels=labels, weights=weights)


def plan_mixed_precision(
    prepared, scheme, config, selection, ranges, source, target, advance
) -> QuantPlan:
    """The plan with the nodes `sensitivity.choose_float_nodes` keeps float, and notes."""
    evaluator = evaluator_on(prepared, source, MIXED_PRECISION_SAMPLES)
    plan_for = planner(prepared, scheme, config, selection, ranges)
    plan, result = choose_float_nodes(plan_for, evaluator, target, on_node=advance)
    kept = {node.name: node for node in result.kept_float}
    nodes = tuple(
        dataclasses.replace(
            node,
            reason=f"kept float by mixed precision: quantized alone it gives "
            f"{kept[node.name].sqnr_db:.1f} dB output SQNR",
        )
        if node.name in kept
        else node
        for node in plan.nodes
    )
    notes = [_mixed_note(result, len(evaluator.samples), _float_weight_bytes(prepared, kept))]
    return dataclasses.replace(plan, nodes=nodes, notes=(*plan.notes, *notes))


def _float_weight_bytes(model: ir.Model, names) -> int:
    """Bytes the weights of the named nodes take in float32 beyond int8 (3 per value)."""
    total = 0
    for node in model.graph:
        if node.name in names:
            for value in node.inputs[1:2]:
                if value is not None and value.const_value is not None:
                    total += value.const_value.nbytes * 3 // 4
    return total


def _mixed_note(result: MixedPrecision, samples: int, extra_bytes: int) -> str:
    def score(s: Score) -> str:
        text = f"{s.sqnr_db:.1f} dB"
        if s.top1_drop_points is not None:
            text += f", top-1 drop {s.top1_drop_points:.1f} points"
        return text

    wanted = []
    if result.target.sqnr_db is not None:
        wanted.append(f"SQNR >= {result.target.sqnr_db:g} dB")
    if result.target.max_top1_drop is not None:
        wanted.append(f"top-1 drop <= {result.target.max_top1_drop:g} points")
    names = ", ".join(node.name for node in result.kept_float) or "none"
    verdict = "reached" if result.reached else "NOT reached even with them float"
    return (
        f"Mixed precision ({' and '.join(wanted)} on {samples} samples): "
        f"{score(result.before)} fully quantized; kept {len(result.kept_float)} node(s) "
        f"float ({names}): {score(result.after)}; target {verdict}. Keeping them float "
        f"costs {extra_bytes} bytes of float32 weights{_latency_cost(result)}."
    )


def _latency_cost(result: MixedPrecision) -> str:
    if result.latency_ms is None:
        return ""
    full, mixed = result.latency_ms
    return (
        f" and latency: {mixed:.3g} ms against {full:.3g} ms fully quantized "
        f"({mixed / full:.2f}x; 1 thread, median of 30 runs on one sample)"
    )
