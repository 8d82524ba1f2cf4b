"""The report as one self-contained HTML page: tables, plus charts drawn as inline SVG.

No script, no font, no stylesheet is fetched: the page opens offline and can be attached
to a CI run as a single file. Charts:

- per-layer SQNR (worst first), one horizontal bar per layer; without per-layer data the
  chart shows the SQNR of each output instead;
- size of each model, and median latency of each model when measured.
"""

from __future__ import annotations

import math
from html import escape
from typing import TYPE_CHECKING

from qconvert import formatting as fmt

if TYPE_CHECKING:
    from qconvert.report import Report

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #1d2330; background: #fff; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #c9d1dc; padding: 4px 10px; text-align: right; }
th { background: #eef2f7; } td:first-child, th:first-child { text-align: left; }
.pass { color: #1a7f37; font-weight: bold; } .fail { color: #cf222e; font-weight: bold; }
svg text { font: 12px system-ui, sans-serif; fill: #1d2330; }
"""
_REFERENCE_COLOUR = "#4c78a8"
_CANDIDATE_COLOUR = "#f58518"
_BAR_HEIGHT = 18
_LABEL_WIDTH = 260
_PLOT_WIDTH = 420


def render_html(report: Report) -> str:
    """The whole page."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>qconvert {escape(report.command)}: {escape(report.model)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>qconvert {escape(report.command)}: {escape(report.model)}</h1>",
    ]
    if report.gates:
        verdict = (
            '<span class="pass">all gates passed</span>'
            if report.passed
            else '<span class="fail">gates failed</span>'
        )
        parts.append(f"<p>Result: {verdict}.</p>")
    conversion = report.conversion
    if conversion is not None:
        parts.append("<h2>Conversion</h2>")
        parts.append(
            _table(
                ["", "value"],
                [
                    ["scheme / format", f"{conversion.scheme} / {conversion.format}"],
                    ["opset", f"{conversion.opset_before} -> {conversion.opset_after}"],
                    ["float size", fmt.size(conversion.float_bytes)],
                    ["quantized size", fmt.size(conversion.converted_bytes)],
                    ["size ratio", fmt.ratio(conversion.size_ratio)],
                    ["calibration samples", str(conversion.calibration_samples)],
                    ["nodes left float", str(len(conversion.float_nodes))],
                ],
            )
        )
    if conversion is not None and conversion.recipe is not None:
        from qconvert.pipelines.recipe import RECIPE_HEADER, recipe_rows

        recipe = conversion.recipe
        title = f"Recipe default, scored on {recipe.samples} {recipe.scored_on}"
        parts.append(f"<h2>{escape(title)}</h2>")
        parts.append(_table(RECIPE_HEADER, recipe_rows(recipe)))
    comparison = report.comparison
    if comparison is not None:
        ref, cand = comparison.reference, comparison.candidate
        parts.append(f"<h2>Reference vs candidate on {comparison.samples} samples</h2>")
        rows = [
            ["model", ref.path, cand.path],
            ["size", fmt.size(ref.bytes), fmt.size(cand.bytes)],
            ["provider", ref.provider, cand.provider],
        ]
        if comparison.reference_accuracy is not None:
            rows.append(
                [
                    "accuracy",
                    fmt.percent(comparison.reference_accuracy),
                    fmt.percent(comparison.candidate_accuracy)
                    + f" (drop {fmt.points(comparison.accuracy_drop_points)})",
                ]
            )
        for label, pick in (("latency median", "median_ms"), ("latency p90", "p90_ms")):
            if ref.latency is not None or cand.latency is not None:
                rows.append(
                    [
                        label,
                        fmt.milliseconds(getattr(ref.latency, pick, None)),
                        fmt.milliseconds(getattr(cand.latency, pick, None)),
                    ]
                )
        parts.append(_table(["", "reference", "candidate"], rows))
        timed = ref.latency is not None or cand.latency is not None
        parts.append("<h2>Size and latency</h2>" if timed else "<h2>Size</h2>")
        bars = [("size, reference", ref.bytes), ("size, candidate", cand.bytes)]
        parts.append(_pair_chart("Model size (bytes)", bars, fmt.size))
        if ref.latency is not None or cand.latency is not None:
            latency = [
                ("latency, reference", ref.latency.median_ms if ref.latency else None),
                ("latency, candidate", cand.latency.median_ms if cand.latency else None),
            ]
            parts.append(_pair_chart("Median latency (ms)", latency, fmt.milliseconds))
        parts.append("<h2>Outputs</h2>")
        parts.append(
            _table(
                ["output", "SQNR dB", "cosine", "max abs err", "rel err", "top-1 agree"],
                [
                    [
                        out.name,
                        fmt.db(out.sqnr_db),
                        f"{out.cosine:.5f}",
                        fmt.number(out.max_abs_error),
                        fmt.number(out.relative_error),
                        fmt.percent(out.top1_agreement),
                    ]
                    for out in comparison.outputs
                ],
            )
        )
        if comparison.layers:
            parts.append("<h2>Per-layer SQNR, worst local SQNR first</h2>")
            parts.append(
                _sqnr_chart(
                    [
                        (f"{layer.node} ({layer.op_type})", layer.local_sqnr_db, layer.sqnr_db)
                        for layer in comparison.layers
                    ]
                )
            )
            parts.append(
                _table(
                    [
                        "node",
                        "op",
                        "tensor",
                        "local SQNR dB",
                        "SQNR dB",
                        "cosine",
                        "max abs err",
                    ],
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
            )
        else:
            parts.append("<h2>SQNR per output</h2>")
            parts.append(
                _sqnr_chart([(out.name, None, out.sqnr_db) for out in comparison.outputs])
            )
    if report.gates:
        parts.append("<h2>Gates</h2>")
        rows = [
            [
                gate.gate,
                fmt.number(gate.threshold),
                "not measured" if gate.measured is None else fmt.number(gate.measured),
                "pass" if gate.passed else "FAIL",
            ]
            for gate in report.gates
        ]
        parts.append(_table(["gate", "threshold", "measured", "result"], rows))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _sqnr_chart(entries: list[tuple[str, float | None, float]]) -> str:
    """Per entry, a bar of its local SQNR (when given) and one of its SQNR in the model.

    Infinite SQNR (no error) draws a full bar marked inf.
    """
    values = [v for _, local, whole in entries for v in (local, whole) if v is not None]
    top = max([v for v in values if math.isfinite(v)] + [1.0])
    bars, row = [], 0
    for label, local, whole in entries:
        for kind, value, colour in (
            ("local", local, _REFERENCE_COLOUR),
            ("in model", whole, _CANDIDATE_COLOUR),
        ):
            if value is None:
                continue
            if math.isnan(value):
                length = 0.0
            elif math.isinf(value):
                length = _PLOT_WIDTH if value > 0 else 0.0
            else:
                length = max(0.0, value) / top * _PLOT_WIDTH
            name = label if kind == "local" or local is None else ""
            bars.append(_bar(row, name, length, colour, f"{fmt.db(value)} dB {kind}"))
            row += 1
    legend = (
        "SQNR (dB), longer is better: blue = the layer alone (local), orange = in the model"
        if any(local is not None for _, local, _ in entries)
        else "SQNR (dB), longer is better"
    )
    return _svg(legend, bars, row)


def _pair_chart(title: str, entries: list[tuple[str, float | None]], show) -> str:
    top = max([value for _, value in entries if value] + [1e-12])
    bars = []
    for index, (label, value) in enumerate(entries):
        length = 0.0 if not value else value / top * _PLOT_WIDTH
        colour = _REFERENCE_COLOUR if index % 2 == 0 else _CANDIDATE_COLOUR
        bars.append(_bar(index, label, length, colour, show(value)))
    return _svg(title, bars, len(entries))


def _bar(index: int, label: str, length: float, colour: str, value: str) -> str:
    y = 24 + index * (_BAR_HEIGHT + 6)
    return (
        f'<text x="0" y="{y + 13}">{escape(label[:40])}</text>'
        f'<rect x="{_LABEL_WIDTH}" y="{y}" width="{length:.1f}" height="{_BAR_HEIGHT}" '
        f'fill="{colour}"><title>{escape(label)}: {escape(value)}</title></rect>'
        f'<text x="{_LABEL_WIDTH + length + 6:.1f}" y="{y + 13}">{escape(value)}</text>'
    )


def _svg(title: str, bars: list[str], count: int) -> str:
    width = _LABEL_WIDTH + _PLOT_WIDTH + 140
    height = 30 + count * (_BAR_HEIGHT + 6)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="{escape(title)}">'
        f'<text x="0" y="14" font-weight="bold">{escape(title)}</text>'
        + "".join(bars)
        + "</svg>"
    )
