"""`qconvert calibrate`: write a calibration file, or merge several into one."""

from __future__ import annotations

from pathlib import Path

import click

from qconvert.cli import _console
from qconvert.cli._options import (
    METHODS,
    image_options,
    image_preprocessing,
    percentile_option,
)


@click.command("calibrate", short_help="Collect calibration statistics into a file.")
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path), metavar="MODEL")
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder of samples: .npy/.npz files, ONNX test_data_set_* folders, one file or "
    "sub-folder per input, or images.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="The calibration file to write. [default: MODEL.calib.json beside MODEL]",
)
@click.option(
    "--samples",
    type=int,
    default=None,
    help="Use a random subset of this many samples. [default: all]",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --samples.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Samples per onnxruntime run (the model's batch dim must be dynamic).",
)
@click.option(
    "--merge",
    is_flag=True,
    help="Merge the calibration files given instead of MODEL into -o (exact: the same as "
    "one run over all their data).",
)
@click.option(
    "--trt-cache",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the ranges as a TensorRT calibration cache.",
)
@click.option(
    "--trt-method",
    type=click.Choice(METHODS),
    default="entropy",
    show_default=True,
    help="The range method of the TensorRT cache.",
)
@percentile_option
@image_options
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
def calibrate_command(inputs: tuple[Path, ...], **options) -> None:
    """Write the calibration statistics of MODEL on the samples of --data.

    Per tensor: min, max and a mergeable histogram, from which `quantize --calib` derives
    ranges by any --method.

    \b
      qconvert calibrate model.onnx --data calib/ -o model.calib.json
      qconvert calibrate --merge part1.json part2.json -o all.json
    """
    from qconvert import api  # deferred: onnxruntime is slow to import and --help is not
    from qconvert.calibration import RangeMethod

    output, force = options.pop("output"), options.pop("force")
    if options.pop("merge"):
        if output is None:
            raise click.UsageError("--merge needs -o FILE for the merged calibration.")
        if len(inputs) < 2:
            raise click.UsageError("--merge needs at least two calibration files.")
        merged = api.merge(list(inputs), output, force=force)
        _console.stdout.print(
            f"merged {len(inputs)} files ({merged.samples} samples, "
            f"{len(merged.observers)} tensors) into {output}"
        )
        return
    if len(inputs) != 1:
        raise click.UsageError("Pass one MODEL (or --merge with calibration files).")
    model = inputs[0]
    data = options.pop("data")
    if data is None:
        raise click.UsageError("calibrate needs samples: pass --data DIR.")
    output = output if output is not None else model.with_suffix(".calib.json")
    trt_method = RangeMethod(
        name=options.pop("trt_method"), percentile=options.pop("percentile")
    )
    progress = _console.BarProgress() if _console.interactive() else None
    calibration = api.calibrate(
        model,
        data,
        output=output,
        samples=options.pop("samples"),
        seed=options.pop("seed"),
        batch_size=options.pop("batch_size"),
        images=image_preprocessing(options),
        trt_cache=options.pop("trt_cache"),
        trt_method=trt_method,
        force=force,
        **({"progress": progress} if progress else {}),
    )
    _console.stdout.print(
        f"calibrated {len(calibration.observers)} tensors on {calibration.samples} samples: "
        f"{output}"
    )
