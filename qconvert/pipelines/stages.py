"""Stages every verb shares: preparing for a scheme, deriving ranges, timing stages."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import onnx_ir as ir

from qconvert import model as model_io
from qconvert.calibration import (
    Calibration,
    RangeMethod,
    derive_ranges,
)
from qconvert.calibration.auto import choose_ranges
from qconvert.config import QuantizeConfig
from qconvert.errors import (
    UnsupportedModelError,
)
from qconvert.passes import (
    UpgradeOpsetPass,
    prepare,
)
from qconvert.schemes import INT16_MIN_OPSET

PathLike = str | os.PathLike[str]

logger = logging.getLogger("qconvert")


MICROSOFT_DOMAIN = "com.microsoft"


def prepare_for_scheme(model: ir.Model, config: QuantizeConfig) -> tuple[ir.Model, str]:
    """Prepares the model; returns it and the domain its Q/DQ nodes go in.

    int16 Q/DQ need ai.onnx opset 21. When the ONNX converter cannot raise the model that
    far, onnxruntime's com.microsoft Q/DQ (int16 at any opset) are used instead.
    """
    target = config.target_opset
    try:
        return prepare(model, min_opset=target), ""
    except UnsupportedModelError:
        scheme_asked_21 = config.opset is None and config.min_opset == INT16_MIN_OPSET
        if not (target == INT16_MIN_OPSET and scheme_asked_21):
            raise
    logger.warning(
        "The model cannot be upgraded to opset %d; writing int16 Q/DQ in the %s domain.",
        INT16_MIN_OPSET,
        MICROSOFT_DOMAIN,
    )
    return prepare(model, min_opset=13), MICROSOFT_DOMAIN


def prepares_alike(model: ir.Model, config: QuantizeConfig) -> bool:
    """Whether calibration's preparation of `model` is also the scheme's.

    Both run the same passes (`passes.prepare`) and differ only in the opset they raise
    the model to: calibration's (`model.OLDEST_OPSET`) and the scheme's
    (`config.target_opset`). A model already at both upgrades to neither, so the two give
    the same model, and `quantize` prepares it once (a tenth to a half of a 224 CNN's
    float pass in CPU time).
    """
    opsets = model.opset_imports
    current = opsets.get("", opsets.get("ai.onnx"))
    return current is not None and current >= max(config.target_opset, model_io.OLDEST_OPSET)


def upgrade_old_opset(model: ir.Model, path: PathLike) -> tuple[ir.Model, bytes | str]:
    """Raises a model older than onnxruntime's oldest opset to it, before anything runs it.

    Returns the model and what onnxruntime should run as the float model: its path when
    unchanged, else the upgraded model's bytes (the file's opset 1 to 6 ops may have no
    onnxruntime kernels). Preparation later raises it on to the scheme's opset.

    Raises:
        UnsupportedModelError: the converter fails, naming the op and the opset step.
    """
    if model.opset_imports.get("", model_io.OLDEST_OPSET) >= model_io.OLDEST_OPSET:
        return model, str(path)
    upgraded = UpgradeOpsetPass(min_opset=model_io.OLDEST_OPSET)(model).model
    return upgraded, model_io.to_bytes(upgraded)


def ranges_of(calibration: Calibration, method: RangeMethod) -> tuple[dict, dict[str, str]]:
    """The ranges of every calibrated tensor, and for `auto` the method chosen for each."""
    if method.name != "auto":
        return dict(derive_ranges(calibration.observers, method)), {}
    choices = choose_ranges(calibration.observers, method)
    ranges = {name: choice.range for name, choice in choices.items()}
    return ranges, {name: choice.method for name, choice in choices.items()}


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Adds the seconds the `with` body takes to `timings[stage]`.

    Added, not set: two stages may share a key (planning, and the notes added to the plan
    after the weight passes, both count as `plan`), and the second would hide the first.
    """
    start = time.perf_counter()
    yield
    timings[stage] = round(timings.get(stage, 0.0) + time.perf_counter() - start, 4)
