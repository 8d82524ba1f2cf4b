"""Verification of every written model: the ONNX checker, then onnxruntime loads and runs it."""

from __future__ import annotations

import numpy as np
import onnx

from qconvert.dataset import Feeds
from qconvert.errors import VerificationError
from qconvert.runtime import describe_error, make_session


def verify_model(model: bytes | str, feeds: Feeds, *, reference: bytes | str | None = None) -> None:
    """Checks that the model is valid ONNX, loads in onnxruntime and runs on `feeds`.

    `model` is the serialized model, or the path of one saved with external data. When the
    run fails or gives NaN/Inf, `reference` (the float model) runs on the same feeds: if it
    fails too, the sample (zeros, when no data was given) says nothing about the conversion
    and the run is not held against it.

    Raises:
        VerificationError: with the stage that failed and onnxruntime's or the checker's words.
    """
    try:
        if isinstance(model, bytes):
            onnx.checker.check_model(onnx.load_model_from_string(model))
        else:
            onnx.checker.check_model(model)  # by path: external data and > 2 GB allowed
    except onnx.checker.ValidationError as exc:
        raise VerificationError(
            f"The converted model fails the ONNX checker: {describe_error(exc)}"
        ) from None
    try:
        session = make_session(model)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class
        raise VerificationError(
            f"onnxruntime cannot load the converted model: {describe_error(exc)}"
        ) from None
    problem = _smoke_problem(session, feeds)
    if problem is not None and (reference is None or _runs_cleanly(reference, feeds)):
        raise VerificationError(problem)


def _smoke_problem(session, feeds: Feeds) -> str | None:
    """Why the smoke run failed, or None when it ran and every float output is finite."""
    try:
        outputs = session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class
        return f"onnxruntime cannot run the converted model: {describe_error(exc)}"
    for meta, array in zip(session.get_outputs(), outputs, strict=True):
        array = np.asarray(array)
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            return f"The converted model's output '{meta.name}' holds NaN or Inf on the smoke sample."
    return None


def _runs_cleanly(reference: bytes | str, feeds: Feeds) -> bool:
    try:
        session = make_session(reference)
    except Exception:  # noqa: BLE001 - a float model that does not load judges nothing
        return False
    return _smoke_problem(session, _cast_like(session, feeds)) is None


def _cast_like(session, feeds: Feeds) -> Feeds:
    """The feeds in the float model's input types (fp16 I/O models take float16 feeds)."""
    types = {meta.name: meta.type for meta in session.get_inputs()}
    return {
        name: array.astype(np.float32) if types.get(name) == "tensor(float)" else array
        for name, array in feeds.items()
    }
