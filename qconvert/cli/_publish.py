"""What quantize and compare do with a finished report: show it, hand it on, judge it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from qconvert import ci
from qconvert.cli import _render
from qconvert.errors import AccuracyGateError
from qconvert.report import Report


def publish(
    result: Report,
    *,
    as_json: bool,
    junit: Path | None,
    track: Callable[[Report], None] | None,
) -> None:
    """Prints the report, then hands it to where users look, then fails on its gates.

    The JUnit file, the GitHub job summary and annotations, and `track` (an MLflow run)
    all receive a report whose gates failed too: the failure is what they are there for.

    Raises:
        AccuracyGateError: a gate failed (exit 1).
    """
    if as_json:
        click.echo(result.to_json(), nl=False)
    else:
        _render.report(result)
    if junit is not None:
        ci.write_junit(result, junit)
    ci.append_step_summary(result)
    if ci.in_github_actions():
        for line in ci.gate_annotations(result):
            click.echo(line, err=as_json)  # stdout stays pure JSON under --json
    if track is not None:
        track(result)
    if result.failed_gates:
        raise AccuracyGateError(
            "gate failed: " + "; ".join(gate.describe() for gate in result.failed_gates)
        )
