"""`calibrate` and `merge`: statistics of a model on a data folder, and their union.

Also the peak magnitudes that fp16 conversion measures the same way (`float16_peaks`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx_ir as ir

from qconvert import model as model_io
from qconvert.calibration import (
    Calibration,
    CollectSettings,
    RangeMethod,
    checked_body_tensors,
    collect_statistics,
    derive_ranges,
    merge_calibrations,
    read_calibration,
    tensors_to_calibrate,
    write_trt_cache,
)
from qconvert.calibration.collect import KeptOutputs, pass_count
from qconvert.calibration.parallel import collect_split
from qconvert.calibration.ray_backend import RayCluster
from qconvert.calibration.shards import DataSpec
from qconvert.dataset import (
    DirectorySource,
    ImagePreprocessing,
    input_specs,
)
from qconvert.errors import (
    ConfigError,
)
from qconvert.limits import DEFAULT_LIMITS, LoadLimits
from qconvert.passes import (
    prepare,
)
from qconvert.pipelines.stages import PathLike
from qconvert.progress import SILENT, Progress
from qconvert.runtime import external_weights

_TRT_METHOD = RangeMethod(name="entropy")  # TensorRT's own default calibrator


def calibrate(
    model: PathLike,
    data: PathLike,
    *,
    output: PathLike | None = None,
    samples: int | None = None,
    seed: int = 0,
    batch_size: int = 1,
    images: ImagePreprocessing | None = None,
    trt_cache: PathLike | None = None,
    trt_method: RangeMethod = _TRT_METHOD,
    workers: int | None = 1,
    ray: RayCluster | None = None,
    tensors_per_pass: int | None = None,
    force: bool = False,
    progress: Progress = SILENT,
    limits: LoadLimits = DEFAULT_LIMITS,
) -> Calibration:
    """Runs `model` on the samples of `data` and returns (and writes) their statistics.

    One calibration serves every range method and every scheme: `quantize(calib=...)`
    derives the ranges from it.

    Args:
        model: the float ONNX model; it is only read.
        data: a folder of samples, in any layout `qconvert.dataset` reads.
        output: the calibration file to write (JSON); None writes nothing.
        samples: use a random subset of this many samples (reproducible from `seed`).
        seed: the seed of that subset.
        batch_size: samples per onnxruntime run; needs a dynamic batch dim.
        images: the preprocessing of an image folder.
        trt_cache: also write the ranges as a TensorRT calibration cache here.
        trt_method: the range method of that cache.
        workers: split the samples over this many local processes (or, with `ray`, this
            many Ray tasks; 1 there means one per CPU of the cluster). None (`--workers
            auto`, the command line's default): start alone and spawn one process per
            further core once the rest of the work would take more than a few seconds
            (`calibration.parallel.run_local`). The statistics are the same however the
            work is split; `Calibration.split` says how it was. Local workers are spawned,
            which re-imports the calling script: it needs the usual `if __name__ ==
            "__main__":` guard, which a library cannot check; so 1 is the default here.
        ray: run the shards on this Ray cluster (needs `pip install qconvert[ray]`).
        tensors_per_pass: expose at most this many tensors per pass over the data, to
            bound memory on big graphs (same statistics, one pass per group).
        force: overwrite existing output files.
        progress: receives progress, one step per sample and pass.
        limits: bounds the model and every sample must respect before they are read, in
            this process and in every worker.
    """
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers} must be at least 1.")
    outputs = [Path(p) for p in (output, trt_cache) if p is not None]
    for path in outputs:
        model_io.check_output_path(path, force=force)
    # The file's hash is computed beside the load and the runs, not after them.
    digest = model_io.fingerprint_ahead(model)
    # past the limit, weights stay on disk for sessions to map (`runtime.external_weights`)
    float_model = model_io.load_model(
        model, limits, keep_external_past=model_io.INLINE_WEIGHTS_LIMIT
    )
    specs = input_specs(float_model)
    if batch_size > 1:
        static = [spec.name for spec in specs if not spec.dims or spec.dims[0] is not None]
        if static:
            raise ConfigError(
                f"--batch-size {batch_size} needs a dynamic batch dim, but input "
                f"'{static[0]}' has a static one.",
                hint="use --batch-size 1 for this model.",
            )
    source = DirectorySource(data, specs, images=images, limits=limits)
    if samples is not None:
        source = source.subset(samples, seed=seed)
    settings = CollectSettings(batch_size=batch_size, tensors_per_pass=tensors_per_pass)
    data_spec = DataSpec(
        folder=str(data),
        specs=specs,
        images=images,
        samples=samples,
        seed=seed,
        limits=limits,
    )
    with external_weights(Path(model).resolve().parent):
        calibration = collect_calibration(
            model,
            float_model,  # no copy: nothing else reads it
            source,
            settings,
            progress,
            data=data_spec,
            workers=workers,
            ray=ray,
            fingerprint=digest,
        )
    if output is not None:
        model_io.write_atomically(Path(output), calibration.to_json().encode("utf-8"))
    if trt_cache is not None:
        ranges = derive_ranges(calibration.observers, trt_method)
        write_trt_cache(Path(trt_cache), ranges, method=trt_method.name)
    return calibration


def merge(
    calibrations: list[PathLike], output: PathLike | None = None, *, force: bool = False
) -> Calibration:
    """Merges calibration files of parts of a data set: the same as one run over all."""
    if len(calibrations) < 2:
        raise ConfigError("--merge needs at least two calibration files.")
    if output is not None:
        model_io.check_output_path(output, force=force)
    merged = merge_calibrations([(str(p), read_calibration(p)) for p in calibrations])
    if output is not None:
        model_io.write_atomically(Path(output), merged.to_json().encode("utf-8"))
    return merged


def collect_calibration(
    path: PathLike,
    float_model,
    source: DirectorySource,
    settings: CollectSettings,
    progress: Progress,
    *,
    data: DataSpec | None = None,
    workers: int | None = 1,
    ray: RayCluster | None = None,
    prepared: bool = False,
    skip: frozenset[str] = frozenset(),
    kept: KeptOutputs | None = None,
    fingerprint: bool | Callable[[], str] = True,
) -> Calibration:
    """Statistics of `float_model` on `source`.

    Calibration runs the model prepared at its own opset (names fixed, BatchNormalization
    folded; opsets 1 to 6, which onnxruntime may lack kernels for, raised to 7): the
    tensors are those every scheme plans with, whatever opset it then needs.
    The preparation changes `float_model` in place: pass a clone if it is read later.
    `prepared`: `float_model` is already `calibration_model`'s result.
    `skip`: tensors not to calibrate (`calibration.deferral`).
    `kept` gets the model's outputs on the first samples (`KeptOutputs`).
    `fingerprint`: hash the model file into the statistics; off for statistics that are
    never written to a file (`quantize --data`'s own: the hash took 40 ms of CPU on a
    45 MB model, 3% of a 64-sample float pass over it). A hash already started
    (`model_io.fingerprint_ahead`) is waited for; True starts one here, beside the work.
    `workers` and `ray` split the samples (`collect_split`); the workers open them again
    as `data` says. Without `data`, this process calibrates alone.
    """
    digest = model_io.fingerprint_ahead(path) if fingerprint is True else fingerprint
    calibrated = float_model if prepared else calibration_model(float_model)
    candidates = tuple(n for n in tensors_to_calibrate(calibrated) if n not in skip)
    tensors = checked_body_tensors(calibrated, candidates, source.first())
    total = len(source) * pass_count(len(tensors), settings)
    with progress.task("Calibrating", total) as advance:
        if data is None:
            observers = collect_statistics(
                calibrated, source, tensors, settings=settings, on_sample=advance, kept=kept
            )
            split = None
        else:
            observers, split = collect_split(
                calibrated,
                source,
                tensors,
                settings=settings,
                data=data,
                workers=workers,
                ray=ray,
                advance=advance,
                kept=kept,
            )
    return Calibration(
        model_sha256=digest() if digest else "",
        model_file=Path(path).name,
        samples=len(source),
        observers=observers,
        split=split,
    )


def calibration_model(float_model: ir.Model) -> ir.Model:
    """`float_model` prepared as calibration runs it (changed in place)."""
    return prepare(float_model, min_opset=model_io.OLDEST_OPSET, in_place=True)


def _measurable(value: ir.Value) -> bool:
    # Scalars (often shape arithmetic) cannot be bound as calibration outputs, and cannot
    # hold a layer's activations anyway.
    # Sequences of float tensors report a float dtype too, but cannot be observed.
    return (
        isinstance(value.type, ir.TensorType)
        and value.dtype == ir.DataType.FLOAT
        and value.shape is not None
        and len(value.shape) > 0
    )


def float16_peaks(float_model, source: DirectorySource, advance) -> dict[str, float]:
    """The largest magnitude each float32 tensor computed by a node reaches on `source`.

    What fp16 conversion reads to keep float32 the nodes whose values would overflow.
    """
    measured = prepare(float_model.clone(), min_opset=model_io.OLDEST_OPSET)
    names = [
        value.name
        for node in measured.graph
        for value in node.outputs
        if value.name and _measurable(value)
    ]
    names += [value.name for value in measured.graph.inputs if _measurable(value)]
    observers = collect_statistics(
        measured,
        source,
        names,
        settings=CollectSettings(histogram_values=0),
        on_sample=advance,
    )
    return {
        name: max(abs(observer.min), abs(observer.max))
        for name, observer in observers.items()
        if observer.count
    }
