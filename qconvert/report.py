"""One Report object for every verb, rendered four ways.

The terminal table lives with the command line (`qconvert.cli._render`); the three file
formats live here and follow the report file's suffix:

- `.json`: the documented schema below, for scripts (`--json` prints the same to stdout);
- `.md`: Markdown tables, for CI job summaries and pull-request comments (`report_markdown`);
- `.html`: one self-contained page, no network assets, charts as inline SVG: every node,
  per-layer SQNR in graph order, calibration ranges, weight spreads, size/latency bars
  (`report_html`). Every figure it draws is in the JSON.

JSON schema, version 1 (`schema_version`; fields are only ever added within a version):

    schema_version  int, 1
    command         "quantize" | "compare"
    model           str: the input (quantize) or reference (compare) model
    output          str | null: the written model (quantize)
    conversion      null | {scheme, format, opset_before, opset_after, float_bytes,
                    converted_bytes, size_ratio, calibration_samples, quantized_ops {op: n},
                    folded_clamps [str], float_nodes [{name, op_type, reason}], notes [str],
                    range_methods {activation tensor: method chosen by --method auto},
                    finished [str], kept [str], refused [str] (pre-quantized models),
                    fusion_audit null | {integer_kernels {op: n}, kernel_count,
                        quantize_nodes, dequantize_nodes, nodes, islands_by_op {op: n},
                        unplanned_islands, islands [{planned, nodes [{name, op_type,
                        planned (true | false | null: a node onnxruntime made), reason}]}]}:
                    what onnxruntime's CPU provider runs (`qconvert.fusion_audit`),
                    nodes [{index, name, op_type, precision, reason}]: every node in
                        graph order; precision int8 | int16 | fp16 | fp16-weights | float,
                    activations [{tensor, range_min, range_max, observed_min,
                        observed_max, clipped (0..1 | null), method}]: per quantized
                        activation, the range its quantization represents against the
                        calibration's extremes, and the share of calibration values outside,
                    weights [{tensor, channels, min_range, median_range, max_range,
                        spread}]: per weight quantized per channel, widest spread first,
                    recipe null | {samples, scored_on, start, trials [{step, kept, before,
                    after, seconds, detail}], raised [{name, op_type, gain_db,
                    work_share, weight_share (0: int8-stored weights), made_float
                    [name]}], final, floor_sqnr_db, min_top1_agreement,
                    budget, kept [step], refit_samples (0: not refitted),
                    raise_search {skipped ('' when it ran), quantized, affordable,
                    scored, gaining, best_alone [name, dB] | null, rejected [why],
                    floor_met}}: what the
                    default recipe tried and kept, each fidelity as {sqnr_db,
                    top1_agreement, top1_rows, per_sample_db [dB, one a held-out
                    sample], frame_agreement (null: no sequence of class
                    distributions among the outputs), frame_rows,
                    per_sample_frames [frames disagreeing, one a held-out sample],
                    class_shifts [{energy, ratio, rows} | null, one a classifier
                    output: the mean lean of its class scores, `class_shift`],
                    expected_flips [{flips, rows, sigma} | null, one a classifier
                    output: the rows its margins and margin error predict to flip,
                    `class_flips`], rest_sqnr_db (null: every output a
                    classifier's, or no flips measured): the worst SQNR of the
                    other outputs}
                    on held-out samples}
    comparison      null | {
        samples       int
        labels        str | null: the labels file accuracy was scored with
        reference, candidate   {path, bytes, provider, accuracy (0..1 | null),
                                latency null | {median_ms, p90_ms, runs, threads}}
        reference_accuracy, candidate_accuracy   0..1 | null
        accuracy_drop_points   float | null: (reference - candidate) x 100
        size_ratio, latency_ratio   float | null: candidate / reference
        outputs       [{name, sqnr_db, cosine, max_abs_error, mean_abs_error,
                        relative_error, top1_agreement, top5_overlap, values,
                        nonfinite_reference, nonfinite_candidate}]
        layers        null | [{node, op_type, tensor, candidate_tensor, local_sqnr_db, sqnr_db,
                        cosine, max_abs_error, mean_abs_error, position}], worst local SQNR
                        first (the HTML report names the first ten); position: the
                        reference node's index in graph order, the x of the SQNR chart
    }
    gates           [{gate, threshold, measured, unit, passed}]
    passed          bool: every gate passed
    seconds         {stage: seconds}

Infinite numbers are written as the strings "inf" and "-inf", NaN as null.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qconvert.calibration.observers import TensorObserver
from qconvert.compare import Comparison
from qconvert.errors import ConfigError, OutputError
from qconvert.fusion_audit import FusionAudit
from qconvert.gates import GateResult
from qconvert.model import write_atomically
from qconvert.plan import QuantPlan
from qconvert.report_detail import (
    ActivationRange,
    NodeRow,
    WeightSpread,
    activation_ranges,
    node_rows,
    weight_spreads,
)

if TYPE_CHECKING:
    from qconvert.recipe_result import RecipeResult

SCHEMA_VERSION = 1
REPORT_SUFFIXES = (".json", ".md", ".html")


@dataclass(frozen=True, slots=True)
class FloatNode:
    """A node left in float, and why."""

    name: str
    op_type: str
    reason: str


@dataclass(frozen=True, slots=True)
class Conversion:
    """What a conversion did to the model."""

    scheme: str
    format: str
    opset_before: int
    opset_after: int
    float_bytes: int
    converted_bytes: int
    calibration_samples: int
    quantized_ops: dict[str, int]
    folded_clamps: tuple[str, ...]
    float_nodes: tuple[FloatNode, ...]
    notes: tuple[str, ...] = ()
    range_methods: dict[str, str] = field(default_factory=dict)
    finished: tuple[str, ...] = ()
    """Pre-quantized models: what was stored as integers, folded or filled in."""
    kept: tuple[str, ...] = ()
    """Pre-quantized models: what was left as the model had it, and why."""
    refused: tuple[str, ...] = ()
    """Pre-quantized models: what could not be finished, and why."""
    fusion_audit: FusionAudit | None = None
    """What onnxruntime's CPU provider runs of the written model (`fusion_audit`)."""
    nodes: tuple[NodeRow, ...] = ()
    activations: tuple[ActivationRange, ...] = ()
    weights: tuple[WeightSpread, ...] = ()
    recipe: RecipeResult | None = None
    """What the default recipe tried, kept and raised (`recipe_result`); None: fast."""

    @property
    def range_summary(self) -> str:
        """How many activations `--method auto` gave each range method, e.g. `minmax x3`."""
        counts = Counter(self.range_methods.values())
        return ", ".join(f"{method} x{n}" for method, n in sorted(counts.items()))

    @property
    def size_ratio(self) -> float:
        """Converted size over float size."""
        return self.converted_bytes / self.float_bytes if self.float_bytes else math.nan

    @classmethod
    def from_plan(
        cls,
        plan: QuantPlan,
        *,
        opsets: tuple[int, int],
        sizes: tuple[int, int],
        samples: int,
        range_methods: dict[str, str] | None = None,
        fusion_audit: FusionAudit | None = None,
        observers: Mapping[str, TensorObserver] | None = None,
        node_schemes: Mapping[str, str] | None = None,
    ) -> Conversion:
        """Summarizes a quantization plan.

        Args:
            plan: the plan the rewrite applied.
            opsets: the ai.onnx opset before and after.
            sizes: the float and the converted model's bytes.
            samples: how many calibration samples the ranges came from.
            range_methods: per activation, the method `--method auto` chose.
            observers: the calibration statistics, for the activation range table.
            node_schemes: per node, the scheme an override file set for it.
            fusion_audit: what onnxruntime's CPU provider runs of the written model.
        """
        quantized = Counter(node.op_type for node in plan.quantized_nodes())
        return cls(
            scheme=plan.scheme.name,
            format=plan.format,
            opset_before=opsets[0],
            opset_after=opsets[1],
            float_bytes=sizes[0],
            converted_bytes=sizes[1],
            calibration_samples=samples,
            quantized_ops=dict(sorted(quantized.items())),
            folded_clamps=tuple(sorted(name for fold in plan.folds for name in fold.nodes)),
            float_nodes=tuple(
                FloatNode(node.name, node.op_type, node.reason) for node in plan.float_nodes()
            ),
            notes=plan.notes,
            range_methods=dict(range_methods or {}),
            fusion_audit=fusion_audit,
            nodes=node_rows(plan, node_schemes),
            activations=activation_ranges(plan, observers or {}, range_methods),
            weights=weight_spreads(plan),
        )


@dataclass(frozen=True, slots=True)
class Report:
    """Everything one command found out, ready to render."""

    command: str
    model: str
    output: str | None = None
    conversion: Conversion | None = None
    comparison: Comparison | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    gates: tuple[GateResult, ...] = ()

    @property
    def size_ratio(self) -> float | None:
        """Converted over float size, from the conversion or else the comparison."""
        if self.conversion is not None:
            return self.conversion.size_ratio
        return self.comparison.size_ratio if self.comparison is not None else None

    @property
    def failed_gates(self) -> tuple[GateResult, ...]:
        """The gates that did not pass."""
        return tuple(gate for gate in self.gates if not gate.passed)

    @property
    def passed(self) -> bool:
        """True when every gate passed (or none was set)."""
        return not self.failed_gates

    def to_dict(self) -> dict:
        """The JSON-ready form (the documented schema)."""
        conversion = None
        if self.conversion is not None:
            conversion = {**asdict(self.conversion), "size_ratio": self.conversion.size_ratio}
            audit = self.conversion.fusion_audit
            conversion["fusion_audit"] = audit.to_dict() if audit is not None else None
        data = {
            "schema_version": SCHEMA_VERSION,
            "command": self.command,
            "model": self.model,
            "output": self.output,
            "conversion": conversion,
            "comparison": (
                _comparison_dict(self.comparison) if self.comparison is not None else None
            ),
            "gates": [asdict(gate) for gate in self.gates],
            "passed": self.passed,
            "seconds": dict(self.seconds),
        }
        return _json_safe(data)

    def to_json(self) -> str:
        """The report as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def to_markdown(self) -> str:
        """The report as Markdown tables."""
        from qconvert.report_markdown import render_markdown

        return render_markdown(self)

    def to_html(self) -> str:
        """The report as one self-contained HTML page."""
        from qconvert.report_html import render_html

        return render_html(self)

    def write(self, path: str | Path) -> None:
        """Writes the report; the format follows the file's suffix."""
        path = Path(path)
        check_report_path(path)
        text = {".json": self.to_json, ".md": self.to_markdown, ".html": self.to_html}[
            path.suffix
        ]()
        write_atomically(path, text.encode())


def check_report_path(path: str | Path) -> None:
    """Fails before any work when the report cannot be written to `path`.

    Raises:
        ConfigError: the suffix names no known format (a usage error).
        OutputError: the folder does not exist.
    """
    path = Path(path)
    if path.suffix not in REPORT_SUFFIXES:
        raise ConfigError(
            f"Report file '{path}' has an unknown format.",
            hint=f"use one of: {', '.join(REPORT_SUFFIXES)}.",
        )
    if not path.parent.is_dir():
        raise OutputError(f"Report folder '{path.parent}' does not exist.")


def _comparison_dict(comparison: Comparison) -> dict:
    data = asdict(comparison)
    outputs = data.pop("outputs")
    layers = data.pop("layers")
    data.update(
        reference_accuracy=comparison.reference_accuracy,
        candidate_accuracy=comparison.candidate_accuracy,
        accuracy_drop_points=comparison.accuracy_drop_points,
        size_ratio=comparison.size_ratio,
        latency_ratio=comparison.latency_ratio,
        outputs=outputs,
        layers=layers,
    )
    return data


def _json_safe(value):
    """Infinite floats become the strings "inf"/"-inf"; JSON has no infinity."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value
