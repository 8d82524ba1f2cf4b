"""`qconvert calibrate`: write a calibration file, or merge several into one."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from qconvert.cli import _console
from qconvert.cli._options import (
    METHODS,
    given_options,
    image_options,
    image_preprocessing,
    limit_options,
    mlflow_options,
    percentile_option,
    workers_option,
)
from qconvert.limits import LoadLimits

if TYPE_CHECKING:
    from qconvert.tracking import MlflowSettings


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
@workers_option(
    "Split the samples over N local processes, one onnxruntime thread each; with --ray, "
    "over N Ray tasks. auto: this process alone, running one batch per core (at most 8) "
    "at once on its one session; with --ray, one task per CPU. The file is the same "
    "however the work is split."
)
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[ADDRESS]",
    help="Run on a Ray cluster: its head's HOST:PORT, ray://HOST:PORT or auto; alone, the "
    "cluster RAY_ADDRESS names or a new local one. Needs pip install 'qconvert[ray]'. "
    "Put --ray last, or write --ray=ADDRESS.",
)
@click.option(
    "--ray-data",
    type=click.Choice(["auto", "shared", "send"]),
    default="auto",
    show_default=True,
    help="How Ray tasks get samples: shared (they read --data, same path on every node), "
    "send (through Ray's object store), auto (shared when the cluster is this machine).",
)
@click.option(
    "--tensors-per-pass",
    type=click.IntRange(min=1),
    default=None,
    help="Fetch the statistics of K tensors per pass over the data (same statistics, "
    "more passes). [default: all in one pass]",
)
@percentile_option
@image_options
@limit_options
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@mlflow_options
def calibrate_command(
    inputs: tuple[Path, ...],
    limits: LoadLimits,
    mlflow: MlflowSettings | None,
    **options,
) -> None:
    """Write the calibration statistics of MODEL on the samples of --data.

    Per tensor: min, max and a mergeable histogram, from which `quantize --calib` derives
    ranges by any --method.

    \b
      qconvert calibrate model.onnx --data calib/ -o model.calib.json
      qconvert calibrate model.onnx --data calib/ --workers 8
      qconvert calibrate --merge part1.json part2.json -o all.json
    """
    # deferred: onnxruntime is slow to import and --help is not; the calibrate pipeline
    # alone, not `qconvert.api`, whose other verbs import every stage
    from qconvert.calibration import RangeMethod
    from qconvert.calibration.ray_backend import RayCluster
    from qconvert.pipelines import calibrate as api

    output, force = options.pop("output"), options.pop("force")
    if options.pop("merge"):
        if mlflow is not None:
            raise click.UsageError("--mlflow logs a calibration run, not --merge.")
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
    ray_address, ray_data = options.pop("ray_address"), options.pop("ray_data")
    ray = None
    if ray_address is not None:
        ray = RayCluster(address=ray_address or None, data=ray_data)
    progress = _console.BarProgress() if _console.interactive() else None
    trt_cache = options.pop("trt_cache")
    started = time.perf_counter()
    calibration = api.calibrate(
        model,
        data,
        output=output,
        samples=options.pop("samples"),
        seed=options.pop("seed"),
        batch_size=options.pop("batch_size"),
        images=image_preprocessing(options),
        trt_cache=trt_cache,
        trt_method=trt_method,
        workers=options.pop("workers"),
        ray=ray,
        tensors_per_pass=options.pop("tensors_per_pass"),
        force=force,
        limits=limits,
        **({"progress": progress} if progress else {}),
    )
    _console.stdout.print(
        f"calibrated {len(calibration.observers)} tensors on {calibration.samples} samples: "
        f"{output}"
    )
    seconds = time.perf_counter() - started
    split = calibration.split
    if split is not None and (len(split.shards) > 1 or split.passes > 1):
        for line in split.describe():
            _console.stdout.print(line, soft_wrap=True)
    if mlflow is not None:
        from qconvert.tracking import log_calibration

        log_calibration(
            calibration,
            output,
            mlflow,
            seconds=seconds,
            options=given_options(click.get_current_context()),
            fingerprints={"model": model, "data": data},
            artifacts=(trt_cache,) if trt_cache is not None else (),
        )
