"""`qconvert inspect`: a model at a glance, and what the int8 scheme would quantize."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from qconvert.cli._options import limit_options
from qconvert.limits import LoadLimits


@click.command("inspect", short_help="Show a model's inputs, ops and quantizable nodes.")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@limit_options
def inspect_command(model: Path, as_json: bool, limits: LoadLimits) -> None:
    """Show MODEL's interface, opset, ops, parameters and quantizable nodes.

    Inputs and outputs, the opset, an op histogram, the parameter count, and the nodes the
    int8 scheme would quantize.
    """
    from qconvert import api  # deferred: onnxruntime is slow to import and --help is not
    from qconvert.cli import _render

    summary = api.inspect(model, limits=limits)
    if as_json:
        click.echo(json.dumps(asdict(summary), indent=2))
    else:
        _render.summary(model, summary)
