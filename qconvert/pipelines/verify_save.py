"""The verify-and-save stage of `quantize`: one smoke run of the written model, then the write.

The sample is the first of the data, else zeros of the input shapes (dynamic dims 1). A
sample the float model itself cannot run proves nothing about the conversion: the model
is then verified structurally (`verify_structure`), written, and one warning and a report
note say it was not run. Outputs the float model already makes NaN or Inf on the sample are
not held against the converted one.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qconvert import model as model_io
from qconvert.dataset import (
    SYNTHETIC,
    DirectorySource,
    Feeds,
    InputSpec,
    Sample,
    synthetic_sample,
)
from qconvert.errors import ModelLoadError, VerificationError
from qconvert.fusion_audit import FusionAudit
from qconvert.pipelines.stages import timed
from qconvert.plan import QuantPlan
from qconvert.runtime import describe_error, make_session
from qconvert.verify import verify_model, verify_structure

logger = logging.getLogger("qconvert")


def verify_and_save_model(
    converted: ir.Model,
    output: Path,
    *,
    model: bytes | str,
    specs: tuple[InputSpec, ...],
    source: DirectorySource | None,
    external: bool,
    timings: dict[str, float],
    plan: QuantPlan | None = None,
) -> tuple[bytes | str, tuple[str, ...], FusionAudit | None]:
    """Verifies `converted` on one sample, then writes it; returns it for the comparison.

    The sample is the first of `source`, else zeros of the input shapes. A sample the
    float model `model` (a path, or bytes once upgraded) cannot run either proves nothing
    about the conversion: the model is then verified structurally and one warning says
    so. Returns the model (its bytes, or its path when it was saved with external data),
    the notes the report adds, and the fusion audit of the session that ran it against
    `plan` (None when verified structurally).
    """
    sample = source.first() if source is not None else synthetic_sample(specs)
    # Without data the float model runs first, to know which outputs zeros already make
    # NaN; with data it runs only if the converted model fails, to tell whose fault it is.
    float_run = _check_synthetic_sample(model, specs, sample) if source is None else None
    feeds = _as_input_types(converted, sample.feeds)
    notes: list[str] = []
    audit: FusionAudit | None = None

    def structurally(staged: bytes | str, run: _FloatRun) -> None:
        verify_structure(staged, reference=model)
        logger.warning(run.warning)
        notes.append(run.note)

    def verify(staged: bytes | str) -> None:
        nonlocal float_run, audit
        if float_run is not None and float_run.error is not None:
            structurally(staged, float_run)
            return
        try:
            audit = verify_model(
                staged, feeds, nonfinite_in_float=_nonfinite(float_run), plan=plan
            )
        except VerificationError:
            if float_run is not None:
                raise  # the float model runs on this sample: the conversion broke it
            float_run = _check_synthetic_sample(model, specs, sample)
            if float_run.error is not None:
                structurally(staged, float_run)
            elif float_run.nonfinite:
                audit = verify_model(
                    staged, feeds, nonfinite_in_float=float_run.nonfinite, plan=plan
                )
            else:
                raise

    if external:
        with timed(timings, "save"):  # the model is verified in place before the rename
            model_io.save_with_external_data(converted, output, verify=verify)
        return str(output), tuple(notes), audit
    with timed(timings, "verify"):
        converted_bytes = model_io.to_bytes(converted)
        verify(converted_bytes)
    with timed(timings, "save"):
        model_io.write_atomically(output, converted_bytes)
    return converted_bytes, tuple(notes), audit


@dataclasses.dataclass(frozen=True, slots=True)
class _FloatRun:
    """How the float model fared on the verification sample.

    Attributes:
        error: onnxruntime's words when it could not run it, else None.
        nonfinite: the float outputs already NaN or Inf on it.
        warning: the one line to warn with when it could not run it.
        note: what the report says then.
    """

    error: str | None = None
    nonfinite: frozenset[str] = frozenset()
    warning: str = ""
    note: str = ""


def _nonfinite(run: _FloatRun | None) -> frozenset[str]:
    return run.nonfinite if run is not None else frozenset()


def _check_synthetic_sample(
    model: bytes | str, specs: tuple[InputSpec, ...], sample: Sample
) -> _FloatRun:
    """Runs the float model on the sample qconvert verifies with.

    Without data that is zeros of the input shapes (dynamic dims 1), which some models
    cannot take. Outputs already NaN or Inf in float (all-zero attention masks do that)
    are not held against the converted model; a sample the float model cannot run at all
    makes verification structural.

    Raises:
        ModelLoadError: onnxruntime cannot load the float model at all (an op it lacks):
            no sample could ever run it, nor the converted model.
    """
    try:
        session = make_session(model, quiet=True)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class
        raise ModelLoadError(
            f"onnxruntime cannot load the model: {describe_error(exc)}"
        ) from None
    try:
        outputs = session.run(None, sample.feeds)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class
        error = describe_error(exc)
        dynamic = [spec for spec in specs if any(d is None for d in spec.dims)]
        if sample.source != SYNTHETIC:
            where = f"sample '{sample.source}'"
            hint = "pass --data with samples the model takes to run it."
        elif dynamic:
            example = dynamic[0]
            dims = "x".join("1" if d is None else str(d) for d in example.dims)
            names = ", ".join(repr(spec.name) for spec in dynamic)
            where = f"the smoke sample (zeros, with the dynamic dims of {names} set to 1)"
            hint = (
                f"pass --data DIR, or fix the dims with --input-shape {example.name}:{dims} "
                "(with the sizes the model takes), to run it."
            )
        else:
            where = "the smoke sample (zeros of its input shapes)"
            hint = "pass --data DIR with real samples to run it."
        checks = "the ONNX checker, strict shape inference, an optimized onnxruntime load"
        return _FloatRun(
            error=error,
            warning=(
                f"The converted model was verified structurally ({checks}), not run: the "
                f"float model itself fails on {where}: {error} Hint: {hint}"
            ),
            note=(
                f"Verified structurally ({checks}), not run: the float model itself fails "
                f"on {where}."
            ),
        )
    return _FloatRun(
        nonfinite=frozenset(
            meta.name
            for meta, array in zip(session.get_outputs(), outputs, strict=True)
            if isinstance(array, np.ndarray)
            and np.issubdtype(array.dtype, np.floating)
            and not np.isfinite(array).all()
        )
    )


def _as_input_types(model: ir.Model, feeds: Feeds) -> Feeds:
    """The feeds cast to the converted model's input types (float16 without keep-io)."""
    dtypes = {value.name: value.dtype for value in model.graph.inputs}
    return {
        name: array.astype(dtypes[name].numpy())
        if dtypes.get(name) is not None and dtypes[name].numpy() != array.dtype
        else array
        for name, array in feeds.items()
    }
