"""One Report object for every verb, written as JSON and shown on the terminal by the CLI.

The JSON schema is versioned (`schema_version`); fields are only ever added within a version.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qconvert.compare import Comparison
from qconvert.errors import ConfigError
from qconvert.model import write_atomically
from qconvert.plan import QuantPlan

SCHEMA_VERSION = 1
REPORT_SUFFIXES = (".json",)


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

    @property
    def size_ratio(self) -> float:
        """Converted size over float size."""
        return self.converted_bytes / self.float_bytes if self.float_bytes else math.nan

    @classmethod
    def from_plan(
        cls, plan: QuantPlan, *, opsets: tuple[int, int], sizes: tuple[int, int], samples: int
    ) -> Conversion:
        """Summarizes a static quantization plan."""
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
            folded_clamps=tuple(sorted(plan.folds)),
            float_nodes=tuple(
                FloatNode(node.name, node.op_type, node.reason) for node in plan.float_nodes()
            ),
            notes=plan.notes,
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

    @property
    def size_ratio(self) -> float | None:
        """Converted size over float size, when a conversion ran."""
        return self.conversion.size_ratio if self.conversion else None

    def to_dict(self) -> dict:
        """The JSON-ready form (the documented schema)."""
        data = {"schema_version": SCHEMA_VERSION, **asdict(self)}
        if self.conversion is not None:
            data["conversion"]["size_ratio"] = self.conversion.size_ratio
        if self.comparison is not None:
            data["comparison"]["accuracy_drop_points"] = self.comparison.accuracy_drop_points
        return _json_safe(data)

    def to_json(self) -> str:
        """The report as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def write(self, path: str | Path) -> None:
        """Writes the report; the format follows the file's suffix."""
        path = Path(path)
        check_report_path(path)
        write_atomically(path, self.to_json().encode())


def check_report_path(path: str | Path) -> None:
    """Fails before any work when the report cannot be written to `path`."""
    path = Path(path)
    if path.suffix not in REPORT_SUFFIXES:
        raise ConfigError(
            f"Report file '{path}' has an unknown format.",
            hint=f"use one of: {', '.join(REPORT_SUFFIXES)}.",
        )
    if not path.parent.is_dir():
        raise ConfigError(f"Report folder '{path.parent}' does not exist.")


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
