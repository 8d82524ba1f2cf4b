"""The report as one self-contained HTML page: the place to understand a conversion.

Nothing is fetched: no script, font, stylesheet or image, and a Content-Security-Policy
meta tag forbids the page from loading any, so it opens offline and can be attached to a
CI run as one file. It needs no JavaScript: the node filter is CSS radio buttons, long
tables fold into `<details>`. Charts are inline SVG (`report_svg`). Sections, each shown
when the report holds its data:

- the conversion, with size bars (and latency bars when measured);
- every node in graph order with its precision and reason, filterable by op type and
  precision;
- where the error comes from: per-layer SQNR in graph order (`--per-layer`), the worst
  ten layers numbered on the chart and named in a table; else the SQNR of each output;
- calibration ranges against the observed values, and the share clipped;
- the spread of per-channel weight ranges, widest first;
- reference vs candidate, outputs, gates, notes, time per stage;
- any further section a report carries (a decision trail, a fusion audit), as tables.

Every figure drawn is also in the JSON report.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from html import escape
from typing import TYPE_CHECKING

from qconvert import formatting as fmt
from qconvert import report_svg as svg
from qconvert.recipe_result import RECIPE_HEADER, recipe_rows
from qconvert.report_sections import extra_sections, worst_layers

if TYPE_CHECKING:
    from qconvert.compare import Comparison
    from qconvert.fusion_audit import FusionAudit
    from qconvert.report import Conversion, Report

CHART_ROWS = 30
"""Rows a range or spread chart draws; the table below it lists every tensor."""
FOLD_ROWS = 200
"""Tables longer than this start folded."""

# A cell that reads as a figure (1.5, -3, 12.0%, 0.28x, 476.5 KiB, inf) aligns right.
_NUMBER = re.compile(r"^-?(\d[\d.,e+-]*|inf)\s*(%|x|dB|ms|B|KiB|MiB|GiB|points)?$")
_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #1d2330; background: #fff;
       max-width: 1200px; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; } h3 { font-size: 14px; }
nav a { margin-right: 12px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #c9d1dc; padding: 3px 8px; text-align: left; }
th { background: #eef2f7; } td.num { text-align: right; }
.pass { color: #1a7f37; font-weight: bold; } .fail { color: #cf222e; font-weight: bold; }
tr.float td { background: #fff6e5; }
svg { display: block; margin: 8px 0; } svg text { font: 12px system-ui, sans-serif;
  fill: #1d2330; }
.filter label { margin-right: 10px; white-space: nowrap; }
.filter input { margin-right: 3px; }
.filter p { margin: 4px 0; }
summary { cursor: pointer; margin: 6px 0; }
"""


def render_html(report: Report) -> str:
    """The whole page."""
    sections: list[tuple[str, str, str]] = []  # (anchor, title, body)
    conversion, comparison = report.conversion, report.comparison
    if conversion is not None:
        sections.append(("conversion", "Conversion", _conversion(report, conversion)))
        if conversion.nodes:
            sections.append(("nodes", "Nodes, in graph order", _nodes(conversion)))
    if comparison is not None and comparison.layers:
        sections.append(("error", "Where the error comes from", _layers(comparison)))
    if conversion is not None and conversion.activations:
        sections.append(("ranges", "Calibration ranges", _ranges(conversion)))
    if conversion is not None and conversion.weights:
        sections.append(("weights", "Per-channel weight ranges", _weights(conversion)))
    if comparison is not None:
        title = f"Reference vs candidate on {comparison.samples} samples"
        sections.append(("comparison", title, _comparison(comparison)))
    if conversion is not None and conversion.fusion_audit is not None:
        sections.append(
            ("audit", "What onnxruntime runs", _fusion_audit(conversion.fusion_audit))
        )
    if conversion is not None and conversion.recipe is not None:
        sections.append(("recipe", _recipe_title(conversion), _recipe(conversion)))
    if report.gates:
        sections.append(("gates", "Gates", _gates(report)))
    for anchor, title, header, rows in extra_sections(report):
        sections.append((anchor, title, _folded(_table(header, rows), len(rows))))
    if conversion is not None and (conversion.notes or conversion.range_methods):
        sections.append(("notes", "Notes", _notes(conversion)))
    if report.seconds:
        rows = [[stage, f"{seconds:.3f}"] for stage, seconds in report.seconds.items()]
        sections.append(("time", "Time per stage", _table(["stage", "seconds"], rows)))
    title = f"qconvert {report.command}: {report.model}"
    filter_css = _filter_css(conversion) if conversion is not None and conversion.nodes else ""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_POLICY}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title>",
        f"<style>{_STYLE}{filter_css}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        _summary(report),
        "<nav>"
        + "".join(f'<a href="#{anchor}">{escape(name)}</a>' for anchor, name, _ in sections)
        + "</nav>",
    ]
    for anchor, name, body in sections:
        parts.append(f'<section id="{anchor}"><h2>{escape(name)}</h2>{body}</section>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _summary(report: Report) -> str:
    facts = []
    if report.gates:
        verdict = (
            '<span class="pass">all gates passed</span>'
            if report.passed
            else '<span class="fail">gates failed</span>'
        )
        facts.append(f"Result: {verdict}.")
    if report.size_ratio is not None:
        facts.append(f"Size ratio {escape(fmt.ratio(report.size_ratio))}.")
    conversion = report.conversion
    if conversion is not None and conversion.nodes:
        counts = Counter(row.precision for row in conversion.nodes)
        listing = ", ".join(f"{n} {precision}" for precision, n in counts.most_common())
        facts.append(f"{len(conversion.nodes)} nodes: {escape(listing)}.")
    if report.comparison is not None and report.comparison.outputs:
        worst = min(report.comparison.outputs, key=lambda out: _sortable(out.sqnr_db))
        facts.append(f"Lowest output SQNR {escape(fmt.db(worst.sqnr_db))} dB.")
    return f"<p>{' '.join(facts)}</p>" if facts else ""


def _conversion(report: Report, conversion: Conversion) -> str:
    rows = fmt.conversion_rows(conversion, report.output)
    body = _table(["", "value"], rows)
    if report.comparison is None:
        body += svg.bars(
            "Model size",
            [
                svg.Bar(
                    "float", conversion.float_bytes, svg.BLUE, fmt.size(conversion.float_bytes)
                ),
                svg.Bar(
                    "quantized",
                    conversion.converted_bytes,
                    svg.ORANGE,
                    fmt.size(conversion.converted_bytes),
                ),
            ],
        )
    return body


def _filter_ids(conversion: Conversion) -> tuple[dict[str, int], dict[str, int]]:
    """Precision and op type -> the number in their radio buttons' ids and rows' classes.

    Numbers, not names: op types of custom domains may hold characters CSS would need
    escaped.
    """
    precisions = sorted({row.precision for row in conversion.nodes})
    ops = sorted({row.op_type for row in conversion.nodes})
    return (
        {name: index for index, name in enumerate(precisions)},
        {name: index for index, name in enumerate(ops)},
    )


def _filter_css(conversion: Conversion) -> str:
    """The node filter: a checked radio button hides the rows of other classes.

    The buttons are the table's earlier siblings, so `:checked ~ table` reaches its rows;
    they are hidden, their labels are what one clicks, the chosen label underlined.
    """
    precision_ids, op_ids = _filter_ids(conversion)
    rules = [".filter > input { position: absolute; opacity: 0; }"]
    for prefix, row_class, ids in (("np", "p", precision_ids), ("no", "o", op_ids)):
        for number in ["all", *ids.values()]:
            if number != "all":
                rules.append(
                    f"#{prefix}{number}:checked ~ table tbody tr:not(.{row_class}{number}) "
                    "{ display: none; }"
                )
            rules.append(
                f'#{prefix}{number}:checked ~ p label[for="{prefix}{number}"] '
                "{ font-weight: bold; text-decoration: underline; }"
            )
    return "\n".join(rules)


def _nodes(conversion: Conversion) -> str:
    """The node table under its filter (see `_filter_css`)."""
    rows = conversion.nodes
    precision_ids, op_ids = _filter_ids(conversion)
    precisions = Counter(row.precision for row in rows)
    ops = Counter(row.op_type for row in rows)
    inputs, labels = [], []
    for prefix, ids, counts in (("np", precision_ids, precisions), ("no", op_ids, ops)):
        inputs.append(f'<input type="radio" name="{prefix}" id="{prefix}all" checked>')
        inputs += [
            f'<input type="radio" name="{prefix}" id="{prefix}{i}">' for i in ids.values()
        ]
        labels.append(
            " ".join(
                [f'<label for="{prefix}all">all</label>']
                + [
                    f'<label for="{prefix}{i}">{escape(name)} ({counts[name]})</label>'
                    for name, i in ids.items()
                ]
            )
        )
    body_rows = "".join(
        f'<tr class="p{precision_ids[row.precision]} o{op_ids[row.op_type]}'
        f'{" float" if row.precision == "float" else ""}">'
        f"<td class=num>{row.index}</td><td>{escape(row.name)}</td>"
        f"<td>{escape(row.op_type)}</td><td>{escape(row.precision)}</td>"
        f"<td>{escape(row.reason)}</td></tr>"
        for row in rows
    )
    return (
        _fold_start(len(rows), f"all {len(rows)} nodes")
        + '<div class="filter">'
        + "".join(inputs)
        + f"<p>Precision: {labels[0]}</p>"
        + f"<p>Op type: {labels[1]}</p>"
        + "<table><thead><tr><th>#</th><th>node</th><th>op</th><th>precision</th>"
        "<th>reason</th></tr></thead><tbody>" + body_rows + "</tbody></table></div></details>"
    )


def _layers(comparison: Comparison) -> str:
    layers = sorted(comparison.layers, key=lambda layer: layer.position)
    worst = worst_layers(comparison.layers)
    chart = svg.line_chart(
        "SQNR of each layer's output in graph order (dB, higher is better)",
        [
            svg.Series(
                "alone (local)",
                svg.BLUE,
                [(layer.position, layer.local_sqnr_db) for layer in _drawn(layers, "local")],
            ),
            svg.Series(
                "in the model",
                svg.ORANGE,
                [(layer.position, layer.sqnr_db) for layer in _drawn(layers, "whole")],
            ),
        ],
        marks=[
            (layer.position, (layer.local_sqnr_db), f"{layer.node} ({layer.op_type})")
            for layer in worst
        ],
        y_label="dB",
        x_label="node index in graph order",
    )
    explain = (
        "<p>Blue: the layer alone, fed the reference's inputs (its own rounding). Orange: "
        "the layer inside the quantized model (every error before it too). Red marks: the "
        "worst layers alone, numbered as in the table. Layers without error (infinite SQNR: "
        "float layers on exact inputs) are left out of the lines.</p>"
    )
    top = _table(
        ["#", "node", "op", *fmt.LAYER_ERROR_HEADER],
        [
            [str(rank), layer.node, layer.op_type, *fmt.layer_error_cells(layer)]
            for rank, layer in enumerate(worst, start=1)
        ],
    )
    full = _table(
        ["position", "node", "op", "tensor", *fmt.LAYER_ERROR_HEADER],
        [
            [
                str(layer.position),
                layer.node,
                layer.op_type,
                layer.candidate_tensor,
                *fmt.layer_error_cells(layer),
            ]
            for layer in layers
        ],
    )
    return (
        chart
        + explain
        + f"<h3>The worst {len(worst)} layers</h3>"
        + top
        + f"<details><summary>all {len(layers)} layers, in graph order</summary>"
        + full
        + "</details>"
    )


def _ranges(conversion: Conversion) -> str:
    rows = conversion.activations
    clipped = [row for row in rows if row.clipped]
    most = sorted(rows, key=_range_interest)[:CHART_ROWS]
    summary = (
        f"<p>{len(rows)} quantized activations; {len(clipped)} clip some calibration values"
        + (
            f", at most {escape(fmt.percent(max(row.clipped for row in clipped)))}"
            if clipped
            else ""
        )
        + ". Grey: the values calibration saw; blue: the range the quantization represents; "
        "red: values beyond it, clipped when the model runs.</p>"
    )
    chart = svg.range_rows(
        f"The {len(most)} activations with the most values clipped, then the least of "
        "their range used",
        [
            (
                row.tensor,
                row.range_min,
                row.range_max,
                row.observed_min,
                row.observed_max,
                "clipped " + _share(row.clipped),
            )
            for row in most
        ],
    )
    table = _table(
        [
            "tensor",
            "method",
            "range min",
            "range max",
            "observed min",
            "observed max",
            "clipped",
        ],
        [
            [
                row.tensor,
                row.method or "",
                fmt.number(row.range_min),
                fmt.number(row.range_max),
                fmt.number(row.observed_min),
                fmt.number(row.observed_max),
                _share(row.clipped),
            ]
            for row in rows
        ],
    )
    return summary + chart + _folded(table, len(rows), force=True, what="activations")


def _weights(conversion: Conversion) -> str:
    rows = conversion.weights
    shown = rows[:CHART_ROWS]
    chart = svg.spread_rows(
        f"The {len(shown)} weights whose channel ranges spread widest",
        [
            (
                row.tensor,
                row.min_range,
                row.median_range,
                row.max_range,
                f"{fmt.number(row.spread)}x over {row.channels} channels",
            )
            for row in shown
        ],
    )
    explain = (
        "<p>Per weight, its channels' ranges (max |w| of each channel) from the narrowest "
        "to the widest; orange marks the median. Per-channel scales absorb the spread; one "
        "scale per tensor would leave the narrow channels few integer levels.</p>"
    )
    table = _table(fmt.WEIGHT_RANGE_HEADER, fmt.weight_range_rows(rows))
    return chart + explain + _folded(table, len(rows), force=True, what="weights")


def _comparison(comparison: Comparison) -> str:
    ref, cand = comparison.reference, comparison.candidate
    rows = fmt.comparison_rows(comparison)
    body = _table(["", "reference", "candidate", "candidate / reference"], rows)
    body += svg.bars(
        "Model size",
        [
            svg.Bar("reference", ref.bytes, svg.BLUE, fmt.size(ref.bytes)),
            svg.Bar("candidate", cand.bytes, svg.ORANGE, fmt.size(cand.bytes)),
        ],
    )
    if ref.latency is not None or cand.latency is not None:
        medians = [side.latency.median_ms if side.latency else None for side in (ref, cand)]
        body += svg.bars(
            "Median latency (ms)",
            [
                svg.Bar("reference", medians[0], svg.BLUE, fmt.milliseconds(medians[0])),
                svg.Bar("candidate", medians[1], svg.ORANGE, fmt.milliseconds(medians[1])),
            ],
        )
    body += "<h3>Outputs</h3>" + _table(fmt.OUTPUT_HEADER, fmt.output_rows(comparison))
    if not comparison.layers:
        body += svg.bars(
            "SQNR of each output (dB, longer is better)",
            [
                svg.Bar(out.name, out.sqnr_db, svg.ORANGE, f"{fmt.db(out.sqnr_db)} dB")
                for out in comparison.outputs
            ],
        )
    return body


def _gates(report: Report) -> str:
    rows = [
        [
            gate.gate,
            fmt.number(gate.threshold),
            "not measured" if gate.measured is None else fmt.number(gate.measured),
            gate.unit,
            "pass" if gate.passed else "FAIL",
        ]
        for gate in report.gates
    ]
    return _table(["gate", "threshold", "measured", "unit", "result"], rows)


def _notes(conversion: Conversion) -> str:
    items = [escape(note) for note in conversion.notes]
    if conversion.range_methods:
        items.append("Range methods (--method auto): " + escape(conversion.range_summary))
    return "<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"


def _recipe_title(conversion: Conversion) -> str:
    recipe = conversion.recipe
    return f"Recipe default, scored on {recipe.samples} {recipe.scored_on}"


def _recipe(conversion: Conversion) -> str:
    """What the default recipe tried, kept and raised (`recipe_result`)."""
    return _table(RECIPE_HEADER, recipe_rows(conversion.recipe))


def _fusion_audit(audit: FusionAudit) -> str:
    """The fusion audit's section: kernels, islands, and a row per island node."""
    parts = [
        _table(
            ["", "value"],
            [
                ["integer kernels", fmt.kernels(audit)],
                ["float islands", fmt.islands(audit)],
            ],
        ),
    ]
    if audit.islands or audit.lost:
        rows = fmt.island_rows(audit)
        parts.append(_folded(_table(["node", "op", "plan", "reason"], rows), len(rows)))
    return "".join(parts)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class=num>{escape(cell)}</td>"
            if _NUMBER.match(cell)
            else f"<td>{escape(cell)}</td>"
            for cell in row
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fold_start(count: int, what: str) -> str:
    state = "" if count > FOLD_ROWS else " open"
    return f"<details{state}><summary>{escape(what)}</summary>"


def _folded(table: str, count: int, *, force: bool = False, what: str = "rows") -> str:
    """The table, folded when long (or always, under a chart that shows the gist)."""
    if count <= FOLD_ROWS and not force:
        return table
    return f"<details><summary>all {count} {escape(what)}</summary>{table}</details>"


def _drawn(layers: list, which: str) -> list:
    """The layers whose SQNR is finite or NaN (a gap); exact ones would flatten the chart."""
    field = "local_sqnr_db" if which == "local" else "sqnr_db"
    return [layer for layer in layers if not math.isinf(getattr(layer, field))]


def _range_interest(row) -> tuple[float, float, str]:
    """Most clipped first; then the range the observed values use least (lost levels)."""
    span = row.range_max - row.range_min
    used = (min(row.observed_max, row.range_max) - max(row.observed_min, row.range_min)) / span
    return (-(row.clipped or 0.0), used if span > 0 else 1.0, row.tensor)


def _share(value: float | None) -> str:
    return "not measured" if value is None else fmt.percent(value)


def _sortable(value: float) -> float:
    return -math.inf if math.isnan(value) else value
