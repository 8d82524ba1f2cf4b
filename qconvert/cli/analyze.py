"""`qconvert analyze`: which nodes cost the most when quantized, worst first."""

from __future__ import annotations

import json
from pathlib import Path

import click

from qconvert.cli import _console
from qconvert.cli._options import (
    image_options,
    image_preprocessing,
    limit_options,
    method_option,
)
from qconvert.limits import LoadLimits


@click.command("analyze", short_help="Rank nodes by how much quantizing them costs.")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder of samples: all calibrate, the first --samples score each node.",
)
@click.option(
    "--samples",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Samples each node's variant is scored on.",
)
@click.option(
    "--scheme",
    type=click.Choice(["int8", "16x8"]),
    default="int8",
    show_default=True,
    help="The static scheme whose nodes are ranked.",
)
@method_option
@image_options
@click.option(
    "--exclude",
    multiple=True,
    metavar="PATTERN",
    help="Nodes to leave float (and out of the ranking). Repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the ranking as JSON.")
@limit_options
def analyze_command(
    model: Path,
    data: Path,
    samples: int,
    scheme: str,
    method: str,
    exclude: tuple[str, ...],
    as_json: bool,
    limits: LoadLimits,
    **image: object,
) -> None:
    """Rank MODEL's quantizable nodes by what quantizing each one alone costs.

    The output SQNR of quantizing each node alone, lowest (most sensitive) first. Keep
    the top ones float with --exclude, or let `quantize --target-sqnr DB` choose.
    """
    from qconvert import api  # deferred: onnxruntime is slow to import and --help is not
    from qconvert.config import QuantizeConfig

    progress = _console.BarProgress() if _console.interactive() and not as_json else None
    result = api.analyze(
        model,
        data=data,
        samples=samples,
        method=method,
        images=image_preprocessing(image),
        config=QuantizeConfig(scheme=scheme, exclude=exclude),
        limits=limits,
        **({"progress": progress} if progress else {}),
    )
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    from rich.table import Table

    table = Table(
        title=f"qconvert analyze: {model} ({result.samples} samples, "
        f"all quantized: {result.full_sqnr_db:.1f} dB)",
        title_justify="left",
    )
    for column in ("rank", "node", "op", "SQNR quantized alone (dB)"):
        table.add_column(column, justify="right" if column != "node" else "left")
    for rank, node in enumerate(result.nodes, 1):
        table.add_row(str(rank), node.name, node.op_type, f"{node.sqnr_db:.1f}")
    _console.stdout.print(table)
    _console.stdout.print(f"took {result.seconds:.1f} s")
