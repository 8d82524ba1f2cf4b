"""Verification of every written model: the ONNX checker, then an onnxruntime run."""

from __future__ import annotations

import numpy as np
import onnx

from qconvert.dataset import Feeds
from qconvert.errors import VerificationError
from qconvert.runtime import describe_error, make_session


def verify_model(
    model: bytes | str, feeds: Feeds, *, nonfinite_in_float: frozenset[str] = frozenset()
) -> None:
    """Checks that the model is valid ONNX, loads in onnxruntime and runs on `feeds`.

    `model` is the serialized model, or the path of one saved with external data. Outputs
    must be finite, except those named in `nonfinite_in_float` (NaN or Inf in the float
    model on the same feeds already).

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
    try:
        outputs = session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - as above
        raise VerificationError(
            f"onnxruntime cannot run the converted model: {describe_error(exc)}"
        ) from None
    for meta, array in zip(session.get_outputs(), outputs, strict=True):
        array = np.asarray(array)
        if meta.name in nonfinite_in_float:
            continue
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise VerificationError(
                f"The converted model's output '{meta.name}' holds NaN or Inf on the smoke "
                "sample."
            )
