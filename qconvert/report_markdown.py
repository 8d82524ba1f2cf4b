"""The report as Markdown: GitHub-flavoured tables for CI job summaries and PR comments.

No charts: the tables behind them. Long per-tensor tables keep their top rows (the most
clipped activations, the widest weight spreads); the JSON and HTML reports hold them all.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from qconvert import formatting as fmt
from qconvert.recipe_result import RECIPE_HEADER, recipe_rows
from qconvert.report_sections import extra_sections, worst_layers

TOP_ROWS = 30
"""Rows of the per-tensor tables (ranges, weights) kept in Markdown."""

if TYPE_CHECKING:
    from qconvert.report import Report


def render_markdown(report: Report) -> str:
    """All sections of the report, each a heading and a table."""
    lines = [f"# qconvert {report.command}: `{report.model}`", ""]
    if report.gates:
        verdict = "all gates passed" if report.passed else "**gates failed**"
        lines += [f"Result: {verdict}.", ""]
    conversion = report.conversion
    if conversion is not None:
        lines += _table(
            "Conversion",
            ["", "value"],
            fmt.conversion_rows(conversion, report.output),
        )
        if conversion.fusion_audit is not None and (
            conversion.fusion_audit.islands or conversion.fusion_audit.lost
        ):
            lines += _table(
                "Float islands (DequantizeLinear -> op -> QuantizeLinear)",
                ["node", "op", "plan", "reason"],
                fmt.island_rows(conversion.fusion_audit),
            )
        lines += _conversion_detail(conversion)
    if conversion is not None and conversion.recipe is not None:
        recipe = conversion.recipe
        title = f"Recipe default, scored on {recipe.samples} {recipe.scored_on}"
        lines += _table(title, RECIPE_HEADER, recipe_rows(recipe))
    comparison = report.comparison
    if comparison is not None:
        rows = fmt.comparison_rows(comparison, path=lambda text: f"`{text}`")
        lines += _table(
            f"Reference vs candidate on {comparison.samples} samples",
            ["", "reference", "candidate", "candidate / reference"],
            rows,
        )
        lines += _table("Outputs", fmt.OUTPUT_HEADER, fmt.output_rows(comparison))
        if comparison.layers:
            lines += _table(
                f"The worst {min(len(comparison.layers), 10)} layers",
                ["node", "op", "position", "local SQNR dB", "SQNR dB"],
                [
                    [
                        layer.node,
                        layer.op_type,
                        str(layer.position),
                        fmt.db(layer.local_sqnr_db),
                        fmt.db(layer.sqnr_db),
                    ]
                    for layer in worst_layers(comparison.layers)
                ],
            )
        if comparison.layers is not None:
            lines += _table(
                "Layers, worst local SQNR first",
                ["node", "op", "tensor", *fmt.LAYER_ERROR_HEADER],
                [
                    [
                        layer.node,
                        layer.op_type,
                        layer.candidate_tensor,
                        *fmt.layer_error_cells(layer),
                    ]
                    for layer in comparison.layers
                ],
            )
    if report.gates:
        lines += _table(
            "Gates",
            ["gate", "threshold", "measured", "result"],
            [
                [
                    gate.gate,
                    fmt.number(gate.threshold),
                    "not measured" if gate.measured is None else fmt.number(gate.measured),
                    "pass" if gate.passed else "**FAIL**",
                ]
                for gate in report.gates
            ],
        )
    for _, title, header, rows in extra_sections(report):
        lines += _table(title, header, rows)
    if conversion is not None and (conversion.notes or conversion.range_methods):
        lines += ["## Notes", ""]
        lines += [f"- {note}" for note in conversion.notes]
        if conversion.range_methods:
            lines.append(f"- Range methods (--method auto): {conversion.range_summary}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _conversion_detail(conversion) -> list[str]:
    """Precision per op type, the nodes left float, the ranges and the weight spreads."""
    lines: list[str] = []
    if conversion.nodes:
        counts = Counter((row.op_type, row.precision) for row in conversion.nodes)
        precisions = sorted({precision for _, precision in counts})
        ops = sorted({op for op, _ in counts})
        lines += _table(
            f"Nodes by op type and precision ({len(conversion.nodes)} nodes)",
            ["op", *precisions],
            [[op, *(str(counts.get((op, p), 0)) for p in precisions)] for op in ops],
        )
    if conversion.float_nodes:
        lines += _table(
            "Nodes left float",
            ["node", "op", "reason"],
            [[node.name, node.op_type, node.reason] for node in conversion.float_nodes],
        )
    if conversion.activations:
        rows = sorted(conversion.activations, key=lambda r: (-(r.clipped or 0.0), r.tensor))
        lines += _table(
            f"Calibration ranges, most clipped first ({min(len(rows), TOP_ROWS)} of "
            f"{len(rows)})",
            ["tensor", "method", "range", "observed", "clipped"],
            [
                [
                    row.tensor,
                    row.method or "",
                    f"{fmt.number(row.range_min)} .. {fmt.number(row.range_max)}",
                    f"{fmt.number(row.observed_min)} .. {fmt.number(row.observed_max)}",
                    "not measured" if row.clipped is None else fmt.percent(row.clipped),
                ]
                for row in rows[:TOP_ROWS]
            ],
        )
    if conversion.weights:
        rows = conversion.weights
        lines += _table(
            f"Per-channel weight ranges, widest spread first ({min(len(rows), TOP_ROWS)} of "
            f"{len(rows)})",
            fmt.WEIGHT_RANGE_HEADER,
            fmt.weight_range_rows(rows[:TOP_ROWS]),
        )
    return lines


def _table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    lines = [f"## {title}", "", _row(header), _row(["---"] * len(header))]
    lines += [_row(row) for row in rows]
    return [*lines, ""]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"
