"""Gates: thresholds a comparison must meet, so a CI job can refuse a bad conversion.

Each gate compares one measured number with a threshold:

    max-top1-drop       accuracy drop in points (reference - candidate) <= threshold
    min-top1-agreement  top-1 agreement in percent, every classifier-like output >= threshold
    min-sqnr            SQNR in dB, every output >= threshold
    min-cosine          cosine similarity, every output >= threshold
    max-size-ratio      candidate bytes / reference bytes <= threshold
    max-latency-ratio   candidate median latency / reference median latency <= threshold

A gate whose number was not measured (no labels, no classifier-like output) fails: a gate
that cannot be checked must not pass silently.

Gates come from the command line or from the `[gates]` table of a TOML file, with the same
names, so a repository keeps them under version control:

    [gates]
    max-top1-drop = 1.0
    min-sqnr = 25
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from qconvert.errors import GatesFileError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

if TYPE_CHECKING:
    from qconvert.compare import Comparison


@dataclass(frozen=True, slots=True, kw_only=True)
class Gates:
    """The thresholds to check; None leaves a gate off.

    Attributes:
        max_top1_drop: the largest accuracy drop allowed, in percentage points.
        min_top1_agreement: the lowest top-1 agreement allowed, in percent.
        min_sqnr: the lowest SQNR allowed on any output, in dB.
        min_cosine: the lowest cosine similarity allowed on any output.
        max_size_ratio: the largest candidate/reference size ratio allowed.
        max_latency_ratio: the largest candidate/reference median latency ratio allowed.
    """

    max_top1_drop: float | None = None
    min_top1_agreement: float | None = None
    min_sqnr: float | None = None
    min_cosine: float | None = None
    max_size_ratio: float | None = None
    max_latency_ratio: float | None = None

    def active(self) -> dict[str, float]:
        """The gates that are on, by their command-line name, in a fixed order."""
        return {
            _option_name(field.name): getattr(self, field.name)
            for field in fields(self)
            if getattr(self, field.name) is not None
        }

    def overridden_by(self, other: Gates) -> Gates:
        """These gates with every gate that `other` sets taking its value."""
        return replace(self, **{_field_name(k): v for k, v in other.active().items()})

    @property
    def needs_labels(self) -> bool:
        """True when a gate reads the accuracy, which only labels give."""
        return self.max_top1_drop is not None

    @property
    def needs_latency(self) -> bool:
        """True when a gate reads the latency ratio."""
        return self.max_latency_ratio is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class GateResult:
    """One gate checked: its name, threshold, the measured value and the verdict."""

    gate: str
    threshold: float
    measured: float | None
    unit: str
    passed: bool

    def describe(self) -> str:
        """One line: `min-sqnr: measured 21.3 dB, needs >= 25 dB`."""
        unit = f" {self.unit}" if self.unit else ""
        measured = (
            "not measured"
            if self.measured is None
            else f"measured {_number(self.measured)}{unit}"
        )
        bound = ">=" if self.gate.startswith("min-") else "<="
        return f"{self.gate}: {measured}, needs {bound} {_number(self.threshold)}{unit}"


NO_GATES = Gates()


def load_gates(path: str | Path) -> Gates:
    """Reads the `[gates]` table of a TOML file.

    Raises:
        GatesFileError: the file is missing or not TOML, has no `[gates]` table, names an
            unknown gate or gives a threshold that is not a number.
    """
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            document = tomllib.load(stream)
    except FileNotFoundError:
        raise GatesFileError(f"Gates file '{path}' does not exist.") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise GatesFileError(f"Gates file '{path}' is not valid TOML: {exc}") from None
    table = document.get("gates")
    if not isinstance(table, dict):
        raise GatesFileError(
            f"Gates file '{path}' has no [gates] table.",
            hint="write e.g. '[gates]' then 'min-sqnr = 25'.",
        )
    known = {_option_name(field.name) for field in fields(Gates)}
    values: dict[str, float] = {}
    for key, value in table.items():
        if key not in known:
            raise GatesFileError(
                f"Gates file '{path}' names an unknown gate '{key}'.",
                hint=f"known gates: {', '.join(sorted(known))}.",
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise GatesFileError(
                f"Gate '{key}' in '{path}' is {value!r}; a threshold must be a number."
            )
        values[_field_name(key)] = float(value)
    return Gates(**values)


def check_gates(gates: Gates, comparison: Comparison) -> tuple[GateResult, ...]:
    """Checks every active gate against the comparison's numbers."""
    results = []
    for gate, threshold in gates.active().items():
        measure, unit = _MEASURES[gate]
        measured = measure(comparison)
        if measured is None or math.isnan(measured):
            passed = False
        elif gate.startswith("min-"):
            passed = measured >= threshold
        else:
            passed = measured <= threshold
        results.append(
            GateResult(
                gate=gate, threshold=threshold, measured=measured, unit=unit, passed=passed
            )
        )
    return tuple(results)


def _worst(values: list[float | None], *, lowest: bool) -> float | None:
    present = [value for value in values if value is not None]
    if not present:
        return None
    return min(present) if lowest else max(present)


def _percent(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


_MEASURES: dict[str, tuple[Callable[[Comparison], float | None], str]] = {
    "max-top1-drop": (lambda c: c.accuracy_drop_points, "points"),
    "min-top1-agreement": (
        lambda c: _percent(_worst([o.top1_agreement for o in c.outputs], lowest=True)),
        "%",
    ),
    "min-sqnr": (lambda c: _worst([o.sqnr_db for o in c.outputs], lowest=True), "dB"),
    "min-cosine": (lambda c: _worst([o.cosine for o in c.outputs], lowest=True), ""),
    "max-size-ratio": (lambda c: c.size_ratio, ""),
    "max-latency-ratio": (lambda c: c.latency_ratio, ""),
}


def _option_name(field_name: str) -> str:
    return field_name.replace("_", "-")


def _field_name(option_name: str) -> str:
    return option_name.replace("-", "_")


def _number(value: float) -> str:
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.4g}"
