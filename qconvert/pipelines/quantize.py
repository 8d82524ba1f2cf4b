"""`quantize`: load -> prepare -> calibrate -> plan -> rewrite -> verify -> save -> evaluate.

The pipeline is `STAGES` (`pipelines.quantize_stages`), a literal list of small stages
over one `QuantizeState` (`pipelines.state`): each takes the state and returns the next,
and is timed into the report. The weight passes and mixed precision, when asked for, run
between planning and rewriting (`weight_passes`, `mixed_precision`). This module turns a
call into a request and runs the stages on it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from qconvert.calibration.deferral import (
    DeferredTensorsNeeded,
)
from qconvert.config import QuantizeConfig
from qconvert.dataset import (
    ImagePreprocessing,
)
from qconvert.errors import (
    ConfigError,
)
from qconvert.limits import DEFAULT_LIMITS, LoadLimits
from qconvert.memory import older_objects_set_aside, return_large_blocks
from qconvert.pipelines import prequantized
from qconvert.pipelines.int4 import quantize_int4
from qconvert.pipelines.quantize_stages import STAGES
from qconvert.pipelines.stages import (
    PathLike,
)
from qconvert.pipelines.state import (
    QuantizeRequest,
    QuantizeState,
    run_stages,
)
from qconvert.progress import SILENT, Progress
from qconvert.recipe_result import RecipeOptions
from qconvert.report import Report
from qconvert.runtime import external_weights

logger = logging.getLogger("qconvert")


def quantize(
    model: PathLike,
    output: PathLike,
    *,
    data: PathLike | None = None,
    calib: PathLike | None = None,
    method: str = "auto",
    percentile: float = 99.99,
    images: ImagePreprocessing | None = None,
    config: QuantizeConfig | None = None,
    eval_data: PathLike | None = None,
    per_layer: bool = False,
    target_sqnr: float | None = None,
    max_top1_drop: float | None = None,
    report: PathLike | None = None,
    force: bool = False,
    workers: int | None = 1,
    progress: Progress = SILENT,
    limits: LoadLimits = DEFAULT_LIMITS,
    strict_kernels: bool = False,
    recipe: str | RecipeOptions = "default",
) -> Report:
    """Quantizes `model` as `config` says and writes `output`.

    Args:
        model: the float ONNX model; it is only read.
        output: where the quantized model goes (refused if it exists, unless `force`).
            A model whose weights live in external data is written with its tensors in
            `<output name>.data` beside it.
        data: a folder of calibration samples, calibrated on the fly (static schemes need
            it or `calib`; int8-dynamic, fp16 and fp16-weights need neither).
        calib: a calibration file from `calibrate` (instead of `data`).
        method: how ranges are derived from the statistics: auto (per tensor, the method
            of least expected error; the report lists the choices), minmax, percentile,
            entropy or mse (see `qconvert.calibration.ranges`).
        percentile: the share of values kept by the percentile method, in percent.
        images: the preprocessing of image folders (`data` and `eval_data`).
        config: scheme, format and controls; `QuantizeConfig()` is int8 QDQ.
        eval_data: a folder of evaluation samples (with `labels.npy` for accuracy): the
            float and quantized models are compared on it and the result goes in the report.
        per_layer: with `eval_data`, also compare every intermediate tensor (per-layer
            SQNR, in graph order in the HTML report).
        target_sqnr: mixed precision: keep the fewest, most sensitive nodes float until
            the output SQNR (dB) on the evaluation samples (`eval_data`, else the first
            calibration samples) is at least this (`qconvert.sensitivity`).
        max_top1_drop: mixed precision: likewise until the top-1 accuracy drop on
            `eval_data` (with labels) is at most this many points.
        report: a file to write the report to (`.json`, `.md` or `.html`).
        force: overwrite an existing output.
        workers: calibrate `data` over this many local processes; None (`--workers
            auto`, the command line's default) starts alone and spawns more once the
            work proves long, as `calibrate` does. The model is the same however the work
            is split. Workers are spawned, which re-imports the calling script: it needs
            the usual `if __name__ == "__main__":` guard, so 1 is the default here.
        progress: receives progress of the long steps.
        limits: bounds the model must respect before its weights are read.
        strict_kernels: add the `strict-kernels` gate: it fails when the fusion audit
            finds a float island the plan did not mean (`qconvert.fusion_audit`).
        recipe: `default` (measure and decide, `pipelines.recipe`) or `fast` (the single
            pass), or `RecipeOptions` with the floor and budget of raising nodes.

    Returns:
        The report: sizes, what was quantized and what was not, and the comparison.

    Example::

        config = QuantizeConfig(scheme="16x8", exclude=("head.*",))
        report = qconvert.quantize("model.onnx", "model.16x8.onnx", data="calib/",
                                   config=config)
    """
    if per_layer and eval_data is None:
        raise ConfigError(
            "--per-layer compares on the evaluation samples: it needs --eval DIR."
        )
    if config is not None and config.scheme == "int4":  # weight-only: its own stages
        return quantize_int4(
            model, output, config=config, data=data, calib=calib, images=images,
            eval_data=eval_data, per_layer=per_layer,
            mixed=target_sqnr is not None or max_top1_drop is not None,
            report=report, force=force, progress=progress, limits=limits,
        )  # fmt: skip
    request = QuantizeRequest(
        model=model,
        output=output,
        data=data,
        calib=calib,
        method=method,
        percentile=percentile,
        images=images,
        config=config if config is not None else QuantizeConfig(),
        eval_data=eval_data,
        per_layer=per_layer,
        target_sqnr=target_sqnr,
        max_top1_drop=max_top1_drop,
        report=report,
        force=force,
        workers=workers,
        progress=progress,
        limits=limits,
        strict_kernels=strict_kernels,
        recipe=RecipeOptions(name=recipe) if isinstance(recipe, str) else recipe,
    )
    if prequantized.applies(model):  # Q/DQ pairs: finished, not quantized again
        return prequantized.finish_request(request)
    # sessions made from the model's bytes find any weights it keeps on disk; the
    # releases between stages skip the objects alive before the run; the copies loading
    # and sessions make go back to the system once freed (`memory`)
    return_large_blocks()
    with external_weights(Path(model).resolve().parent), older_objects_set_aside():
        try:
            state = run_stages(STAGES, QuantizeState(request=request))
        except DeferredTensorsNeeded as needed:
            # Rare: the plan reads a tensor calibration deferred (`calibration.deferral`).
            # Nothing was written yet; the run starts over, calibrating every tensor.
            logger.info(
                "The plan reads %d tensor(s) calibration deferred (%s): calibrating "
                "every tensor.",
                len(needed.names),
                needed,
            )
            state = run_stages(STAGES, QuantizeState(request=request, defer=False))
    assert state.report is not None  # the last stage always writes it
    return state.report
