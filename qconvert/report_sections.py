"""What the HTML and Markdown reports pick alike: the worst layers, and further sections.

A report grows: later work adds fields to `Report` or `Conversion` (a recipe's decision
trail, verification's fusion audit). Rather than wait for each renderer to learn each
field, every field the renderers do not draw themselves becomes a section of its own: a
table when it holds a list of records, a list when it holds strings, a two-column table
when it holds one record.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qconvert.layers import LayerMetrics
    from qconvert.report import Report

WORST_LAYERS = 10

# The fields each renderer already draws in its own sections.
_DRAWN_REPORT = frozenset(
    {"command", "model", "output", "conversion", "comparison", "seconds", "gates"}
)
_DRAWN_CONVERSION = frozenset(
    {
        "scheme",
        "format",
        "opset_before",
        "opset_after",
        "float_bytes",
        "converted_bytes",
        "calibration_samples",
        "quantized_ops",
        "folded_clamps",
        "float_nodes",
        "notes",
        "range_methods",
        "nodes",
        "activations",
        "weights",
        "fusion_audit",
        "recipe",
    }
)
_TITLES = {
    "trail": "Decision trail",
    "decisions": "Decision trail",
    "recipe": "Recipe",
    "recipe_trail": "Decision trail",
    "audit": "Fusion audit",
    "fusion_audit": "Fusion audit",
    "fusion": "Fusion audit",
    "finished": "Pre-quantized: finished",
    "kept": "Pre-quantized: kept as the model had it",
    "refused": "Pre-quantized: could not be finished",
}


def worst_layers(layers: Sequence[LayerMetrics], count: int = WORST_LAYERS) -> list:
    """The `count` layers of lowest local SQNR (NaN first), worst first."""

    def key(layer: LayerMetrics) -> tuple[float, float, str]:
        local = -math.inf if math.isnan(layer.local_sqnr_db) else layer.local_sqnr_db
        whole = -math.inf if math.isnan(layer.sqnr_db) else layer.sqnr_db
        return (local, whole, layer.node)

    return sorted(layers, key=key)[:count]


def extra_sections(report: Report) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(anchor, title, header, rows) for every field the renderers do not draw."""
    found: list[tuple[str, Any]] = []
    found += _undrawn(report, _DRAWN_REPORT)
    if report.conversion is not None:
        found += _undrawn(report.conversion, _DRAWN_CONVERSION)
    sections = []
    for name, value in found:
        header, rows = as_table(value)
        if rows:
            title = _TITLES.get(name, name.replace("_", " ").capitalize())
            sections.append((name.replace("_", "-"), title, header, rows))
    return sections


def as_table(value: Any) -> tuple[list[str], list[list[str]]]:
    """A header and rows that show `value`: records as rows, a record as key/value pairs."""
    value = _plain(value)
    if isinstance(value, Mapping):
        return ["", "value"], [[str(key), _cell(item)] for key, item in value.items()]
    if isinstance(value, list | tuple):
        if all(isinstance(item, Mapping) for item in value):
            header = list(dict.fromkeys(key for item in value for key in item))
            return header, [[_cell(item.get(key, "")) for key in header] for item in value]
        return [""], [[_cell(item)] for item in value]
    return [""], [[_cell(value)]] if value not in (None, "") else []


def _undrawn(record: Any, drawn: Iterable[str]) -> list[tuple[str, Any]]:
    if not dataclasses.is_dataclass(record):
        return []
    drawn = set(drawn)
    return [
        (field.name, getattr(record, field.name))
        for field in dataclasses.fields(record)
        if field.name not in drawn and getattr(record, field.name) not in (None, (), [], {})
    ]


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _cell(value: Any) -> str:
    value = _plain(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping | list):
        return json.dumps(_plain_deep(value), default=str)
    return str(value)


def _plain_deep(value: Any) -> Any:
    value = _plain(value)
    if isinstance(value, Mapping):
        return {str(key): _plain_deep(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain_deep(item) for item in value]
    return value
