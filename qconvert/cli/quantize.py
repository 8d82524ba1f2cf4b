"""`qconvert quantize`: write a quantized model and report what it cost."""

from __future__ import annotations

from pathlib import Path

import click

from qconvert.cli import _console, _render
from qconvert.cli._options import (
    image_options,
    image_preprocessing,
    method_option,
    percentile_option,
)
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
    help="Folder of calibration samples (see `qconvert calibrate --help` for layouts).",
)
@click.option(
    "--calib",
    type=click.Path(path_type=Path),
    default=None,
    help="A calibration file from `qconvert calibrate`, instead of --data.",
)
@method_option
@percentile_option
@image_options
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
    calib: Path | None,
    method: str,
    percentile: float,
    scheme: str,
    per_channel: bool,
    eval_data: Path | None,
    report: Path | None,
    as_json: bool,
    force: bool,
    **image: object,
) -> None:
    """Quantize MODEL and write the result.

    Activation ranges come from --data (calibrated now) or --calib (a file written by
    `qconvert calibrate`), derived by --method.

    The input model is never modified; the output is written only after it passes the ONNX
    checker and runs in onnxruntime.
    """
    from qconvert import api  # deferred: onnxruntime is slow to import and --help is not

    if data is None and calib is None:
        raise click.UsageError(
            f"scheme '{scheme}' needs calibration data: pass --data DIR or --calib FILE."
        )
    if data is not None and calib is not None:
        raise click.UsageError("pass --data or --calib, not both.")
    output = output if output is not None else model.with_suffix(f".{scheme}.onnx")
    progress = _console.BarProgress() if _console.interactive() and not as_json else None
    result = api.quantize(
        model,
        output,
        data=data,
        calib=calib,
        method=method,
        percentile=percentile,
        images=image_preprocessing(image),
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
