"""The report as Markdown: GitHub-flavoured tables for CI job summaries and PR comments."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qconvert import formatting as fmt

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
            [
                ["scheme / format", f"{conversion.scheme} / {conversion.format}"],
                ["opset", f"{conversion.opset_before} -> {conversion.opset_after}"],
                ["float size", fmt.size(conversion.float_bytes)],
                ["quantized size", fmt.size(conversion.converted_bytes)],
                ["size ratio", fmt.ratio(conversion.size_ratio)],
                ["calibration samples", str(conversion.calibration_samples)],
                [
                    "quantized nodes",
                    ", ".join(f"{op} x{n}" for op, n in conversion.quantized_ops.items())
                    or "none",
                ],
                ["nodes left float", str(len(conversion.float_nodes))],
                *(
                    [["ranges (auto)", conversion.range_summary]]
                    if conversion.range_methods
                    else []
                ),
                ["written to", str(report.output)],
            ],
        )
    if conversion is not None and conversion.recipe is not None:
        from qconvert.pipelines.recipe import RECIPE_HEADER, recipe_rows

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
        lines += _table(
            "Outputs",
            [
                "output",
                "SQNR dB",
                "cosine",
                "max abs err",
                "mean abs err",
                "rel err",
                "top-1 agree",
                "top-5 overlap",
            ],
            [
                [
                    out.name,
                    fmt.db(out.sqnr_db),
                    f"{out.cosine:.5f}",
                    fmt.number(out.max_abs_error),
                    fmt.number(out.mean_abs_error),
                    fmt.number(out.relative_error),
                    fmt.percent(out.top1_agreement),
                    fmt.percent(out.top5_overlap),
                ]
                for out in comparison.outputs
            ],
        )
        if comparison.layers is not None:
            lines += _table(
                "Layers, worst local SQNR first",
                ["node", "op", "tensor", "local SQNR dB", "SQNR dB", "cosine", "max abs err"],
                [
                    [
                        layer.node,
                        layer.op_type,
                        layer.candidate_tensor,
                        fmt.db(layer.local_sqnr_db),
                        fmt.db(layer.sqnr_db),
                        f"{layer.cosine:.5f}",
                        fmt.number(layer.max_abs_error),
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
    return "\n".join(lines).rstrip() + "\n"


def _table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    lines = [f"## {title}", "", _row(header), _row(["---"] * len(header))]
    lines += [_row(row) for row in rows]
    return [*lines, ""]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"
