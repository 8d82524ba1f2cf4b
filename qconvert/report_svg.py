"""The charts of the HTML report, as inline SVG text: no script, no font, no fetch.

Four kinds, each a function returning one `<svg>` element:

- `bars`: one horizontal bar per entry (sizes, latencies, SQNR per output);
- `line_chart`: one or more series over positions, with named points marked (per-layer
  SQNR in graph order, the worst layers numbered);
- `range_rows`: per tensor, the observed [min, max] as a grey bar with the quantized range
  over it and the clipped parts in red, each row scaled to its own values;
- `spread_rows`: per weight, its channels' ranges from the narrowest to the widest on a
  log scale, the median marked.

Every mark carries a `<title>` with its label and value, which browsers show on hover.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

BLUE = "#4c78a8"
ORANGE = "#f58518"
GREY = "#b8c2cc"
RED = "#cf222e"
TEXT = "#1d2330"

BAR_HEIGHT = 18
ROW = BAR_HEIGHT + 6
LABEL_WIDTH = 260
PLOT_WIDTH = 420
LABEL_CHARS = 40


@dataclass(frozen=True, slots=True)
class Bar:
    """One bar: its label, its length's value (None: not measured), its colour, its text."""

    label: str
    value: float | None
    colour: str
    text: str


@dataclass(frozen=True, slots=True)
class Series:
    """One line of a line chart: points (x, y), y NaN for a gap, y inf drawn at the top."""

    name: str
    colour: str
    points: Sequence[tuple[float, float]]


def bars(title: str, entries: Sequence[Bar]) -> str:
    """Horizontal bars scaled to the longest finite value; +inf draws a full bar."""
    finite = [abs(e.value) for e in entries if e.value is not None and math.isfinite(e.value)]
    top = max([*finite, 1e-12])
    parts = []
    for index, entry in enumerate(entries):
        value = entry.value
        if value is None or math.isnan(value):
            length = 0.0
        elif math.isinf(value):
            length = PLOT_WIDTH if value > 0 else 0.0
        else:
            length = max(0.0, value) / top * PLOT_WIDTH
        y = 24 + index * ROW
        parts.append(
            _label(entry.label, y)
            + f'<rect x="{LABEL_WIDTH}" y="{y}" width="{length:.1f}" height="{BAR_HEIGHT}" '
            f'fill="{entry.colour}">{_title(entry.label, entry.text)}</rect>'
            f'<text x="{LABEL_WIDTH + length + 6:.1f}" y="{y + 13}">'
            f"{escape(entry.text)}</text>"
        )
    return _svg(title, LABEL_WIDTH + PLOT_WIDTH + 160, 30 + len(entries) * ROW, parts)


def line_chart(
    title: str,
    series: Sequence[Series],
    *,
    marks: Sequence[tuple[float, float, str]] = (),
    y_label: str = "",
    x_label: str = "",
) -> str:
    """Series over x, with numbered marks (x, y, label) listed beside the chart.

    The y axis spans the finite values; infinite ones sit on the top edge.
    """
    width, height = 900, 300
    left, right, top, bottom = 56, 16, 52, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points if math.isfinite(y)]
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if x1 == x0:
        x1 = x0 + 1.0
    y0, y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
    y0, y1 = math.floor(y0 / 10.0) * 10.0, math.ceil(y1 / 10.0) * 10.0
    if y1 == y0:
        y1 = y0 + 10.0

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        if math.isinf(y):
            y = y1 if y > 0 else y0
        return top + (y1 - y) / (y1 - y0) * plot_h

    parts = [
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
        f'stroke="{GREY}"/>'
    ]
    for tick in _ticks(y0, y1):
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{py(tick):.1f}" y2="{py(tick):.1f}" '
            f'stroke="#eef2f7"/><text x="{left - 6}" y="{py(tick) + 4:.1f}" '
            f'text-anchor="end">{tick:g}</text>'
        )
    parts.append(
        f'<text x="{left}" y="{height - 8}">{escape(x_label)}</text>'
        f'<text x="{left + plot_w}" y="{height - 8}" text-anchor="end">'
        f"{x0:g} .. {x1:g}</text>"
        f'<text x="4" y="{top - 4}">{escape(y_label)}</text>'
    )
    for one in series:
        for segment in _segments(one.points):
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in segment)
            if len(segment) == 1:
                x, y = segment[0]
                parts.append(
                    f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2" fill="{one.colour}"/>'
                )
            else:
                parts.append(
                    f'<polyline points="{path}" fill="none" stroke="{one.colour}" '
                    f'stroke-width="1.5"/>'
                )
    for number, (x, y, label) in enumerate(marks, start=1):
        parts.append(
            f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="5" fill="{RED}">'
            f"{_title(label, f'{y:.1f}')}</circle>"
            f'<text x="{px(x) + 6:.1f}" y="{py(y) - 6:.1f}" fill="{RED}">{number}</text>'
        )
    legend_x = left
    for one in series:
        parts.append(
            f'<rect x="{legend_x}" y="{top - 24}" width="12" height="4" fill="{one.colour}"/>'
            f'<text x="{legend_x + 16}" y="{top - 18}">{escape(one.name)}</text>'
        )
        legend_x += 20 + 7 * len(one.name)
    return _svg(title, width, height, parts)


def range_rows(
    title: str,
    rows: Sequence[tuple[str, float, float, float, float, str]],
) -> str:
    """Per row (label, range min, range max, observed min, observed max, text).

    Each row's track spans its own extremes, so tensors of any magnitude compare.
    """
    parts = []
    for index, (label, low, high, seen_low, seen_high, text) in enumerate(rows):
        y = 24 + index * ROW
        span_low, span_high = min(low, seen_low), max(high, seen_high)
        width = span_high - span_low or 1.0

        def px(value: float, base=span_low, width=width) -> float:
            return LABEL_WIDTH + (value - base) / width * PLOT_WIDTH

        parts.append(_label(label, y))
        parts.append(
            f'<rect x="{px(seen_low):.1f}" y="{y}" width="{px(seen_high) - px(seen_low):.1f}" '
            f'height="{BAR_HEIGHT}" fill="{GREY}">'
            f"{_title(label, f'observed {seen_low:.4g} .. {seen_high:.4g}')}</rect>"
        )
        inner_low, inner_high = max(low, seen_low), min(high, seen_high)
        if inner_high > inner_low:
            parts.append(
                f'<rect x="{px(inner_low):.1f}" y="{y + 4}" '
                f'width="{px(inner_high) - px(inner_low):.1f}" height="{BAR_HEIGHT - 8}" '
                f'fill="{BLUE}">{_title(label, f"range {low:.4g} .. {high:.4g}")}</rect>'
            )
        for start, end in ((seen_low, min(low, seen_high)), (max(high, seen_low), seen_high)):
            if end > start:
                parts.append(
                    f'<rect x="{px(start):.1f}" y="{y}" width="{px(end) - px(start):.1f}" '
                    f'height="{BAR_HEIGHT}" fill="{RED}">'
                    f"{_title(label, f'clipped {start:.4g} .. {end:.4g}')}</rect>"
                )
        parts.append(
            f'<text x="{LABEL_WIDTH + PLOT_WIDTH + 6}" y="{y + 13}">{escape(text)}</text>'
        )
    return _svg(title, LABEL_WIDTH + PLOT_WIDTH + 200, 30 + len(rows) * ROW, parts)


def spread_rows(title: str, rows: Sequence[tuple[str, float, float, float, str]]) -> str:
    """Per row (label, min, median, max, text) on one shared log scale."""
    values = [v for _, low, mid, high, _ in rows for v in (low, mid, high) if v > 0]
    if not values:
        return _svg(title, LABEL_WIDTH + PLOT_WIDTH + 200, 30, [])
    lo, hi = math.log10(min(values)), math.log10(max(values))
    span = hi - lo or 1.0

    def px(value: float) -> float:
        value = max(value, 10**lo)
        return LABEL_WIDTH + (math.log10(value) - lo) / span * PLOT_WIDTH

    parts = []
    for index, (label, low, mid, high, text) in enumerate(rows):
        y = 24 + index * ROW
        parts.append(_label(label, y))
        parts.append(
            f'<rect x="{px(low):.1f}" y="{y + 5}" width="{max(px(high) - px(low), 1.0):.1f}" '
            f'height="{BAR_HEIGHT - 10}" fill="{BLUE}">'
            f"{_title(label, f'channel ranges {low:.4g} .. {high:.4g}')}</rect>"
            f'<rect x="{px(mid) - 1.5:.1f}" y="{y}" width="3" height="{BAR_HEIGHT}" '
            f'fill="{ORANGE}">{_title(label, f"median {mid:.4g}")}</rect>'
            f'<text x="{LABEL_WIDTH + PLOT_WIDTH + 6}" y="{y + 13}">{escape(text)}</text>'
        )
    parts.append(
        f'<text x="{LABEL_WIDTH}" y="{34 + len(rows) * ROW}">{10**lo:.3g}</text>'
        f'<text x="{LABEL_WIDTH + PLOT_WIDTH}" y="{34 + len(rows) * ROW}" '
        f'text-anchor="end">{10**hi:.3g} (log scale)</text>'
    )
    return _svg(title, LABEL_WIDTH + PLOT_WIDTH + 200, 44 + len(rows) * ROW, parts)


def _segments(points: Sequence[tuple[float, float]]) -> list[list[tuple[float, float]]]:
    """The runs of points between NaNs."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in points:
        if math.isnan(y):
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append((x, y))
    return [run for run in runs if run]


def _ticks(low: float, high: float) -> list[float]:
    step = 10.0 ** math.floor(math.log10(high - low))
    if (high - low) / step < 4:
        step /= 2
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def _label(label: str, y: int) -> str:
    short = label if len(label) <= LABEL_CHARS else label[: LABEL_CHARS - 1] + "\u2026"
    return f'<text x="0" y="{y + 13}">{escape(short)}</text>'


def _title(label: str, value: str) -> str:
    return f"<title>{escape(label)}: {escape(value)}</title>"


def _svg(title: str, width: int, height: int, parts: Sequence[str]) -> str:
    head = f'<text x="0" y="14" font-weight="bold">{escape(title)}</text>'
    return (
        f'<svg width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">'
        f"<title>{escape(title)}</title>{head}" + "".join(parts) + "</svg>"
    )
