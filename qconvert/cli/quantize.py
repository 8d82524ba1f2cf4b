"""`qconvert quantize`: write a quantized model and report what it cost."""

from __future__ import annotations

from pathlib import Path

import click

from qconvert.cli import _console, _render
from qconvert.schemes import SCHEMES


@click.command("quantize", short_help="Quantize a float ONNX model.")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Where to write the quantized model. [default: MODEL.SCHEME.onnx beside MODEL]",
)
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder of calibration samples (.npy or .npz, one sample a file).",
)
@click.option(
    "--scheme",
    type=click.Choice(sorted(SCHEMES)),
    default="int8",
    show_default=True,
    help="int8: uint8 activations, int8 weights, int32 bias, QDQ format.",
)
@click.option(
    "--per-channel/--per-tensor",
    default=True,
    show_default=True,
    help="One weight scale per output channel, or one per weight tensor.",
)
@click.option(
    "--eval",
    "eval_data",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder of evaluation samples (labels.npy inside gives accuracy): compare the "
    "float and quantized models on it.",
)
@click.option(
    "--report",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the report to this file (.json, .md or .html).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report to stdout only.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def quantize_command(
    model: Path,
    output: Path | None,
    data: Path | None,
    scheme: str,
    per_channel: bool,
    eval_data: Path | None,
    report: Path | None,
    as_json: bool,
    force: bool,
) -> None:
    """Quantize MODEL with ranges calibrated on --data and write the result.

    The input model is never modified; the output is written only after it passes the ONNX
    checker and runs in onnxruntime.
    """
    from qconvert import api  # deferred: onnxruntime is slow to import and --help is not

    if data is None:
        raise click.UsageError(f"scheme '{scheme}' needs calibration data: pass --data DIR.")
    output = output if output is not None else model.with_suffix(f".{scheme}.onnx")
    progress = _console.BarProgress() if _console.interactive() and not as_json else None
    result = api.quantize(
        model,
        output,
        data=data,
        scheme=scheme,
        per_channel=per_channel,
        eval_data=eval_data,
        report=report,
        force=force,
        **({"progress": progress} if progress else {}),
    )
    if as_json:
        click.echo(result.to_json(), nl=False)
    else:
        _render.report(result)
