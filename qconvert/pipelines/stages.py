"""Stages every verb shares: preparing for a scheme, deriving ranges, timing stages."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import onnx_ir as ir

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


def ranges_of(calibration: Calibration, method: RangeMethod) -> tuple[dict, dict[str, str]]:
    """The ranges of every calibrated tensor, and for `auto` the method chosen for each."""
    if method.name != "auto":
        return dict(derive_ranges(calibration.observers, method)), {}
    choices = choose_ranges(calibration.observers, method)
    ranges = {name: choice.range for name, choice in choices.items()}
    return ranges, {name: choice.method for name, choice in choices.items()}


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Records the seconds the `with` body takes as `timings[stage]`."""
    start = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - start, 4)
