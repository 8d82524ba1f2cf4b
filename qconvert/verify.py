"""Verification of every written model: the ONNX checker, then an onnxruntime run.

A model no sample can run (the float model fails on it too) is verified structurally
instead (`verify_structure`).

The session of that run also writes the graph onnxruntime optimized, which the fusion
audit reads (`fusion_audit`).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qconvert.dataset import Feeds
from qconvert.errors import VerificationError
from qconvert.fusion_audit import OPTIMIZED_CONFIG, FusionAudit, audit_file
from qconvert.plan import QuantPlan
from qconvert.runtime import describe_error, make_session

logger = logging.getLogger("qconvert")


def verify_model(
    model: bytes | str,
    feeds: Feeds,
    *,
    nonfinite_in_float: frozenset[str] = frozenset(),
    plan: QuantPlan | None = None,
    audit: bool = True,
) -> FusionAudit | None:
    """Checks that the model is valid ONNX, loads in onnxruntime and runs on `feeds`.

    `model` is the serialized model, or the path of one saved with external data. Outputs
    must be finite, except those named in `nonfinite_in_float` (NaN or Inf in the float
    model on the same feeds already).

    With `audit` off (a pipeline with nothing to audit), onnxruntime writes no optimized
    graph: on a model of hundreds of MB that saves writing it and reading it again.

    Returns:
        The fusion audit of the session that ran, against `plan`; None when onnxruntime
        could not write its optimized graph (the model is still verified), or `audit` is
        off.

    Raises:
        VerificationError: with the stage that failed and onnxruntime's or the checker's words.
    """
    if not audit:
        _verify(model, feeds, nonfinite_in_float, None)
        return None
    with tempfile.TemporaryDirectory(prefix="qconvert-verify-") as folder:
        optimized = Path(folder) / "optimized.onnx"
        written = _verify(model, feeds, nonfinite_in_float, optimized)
        if not optimized.exists():
            return None
        return audit_file(optimized, plan, written=written.graph)


def _verify(
    model: bytes | str,
    feeds: Feeds,
    nonfinite_in_float: frozenset[str],
    optimized: Path | None,
) -> onnx.ModelProto:
    """Runs the checks; returns the model as written, its weights not read when a path.

    `optimized`: where onnxruntime writes the graph it runs; None for no audit.
    """
    _check(model)
    if isinstance(model, bytes):
        written = onnx.load_model_from_string(model)
    else:
        written = onnx.load(model, load_external_data=False)
    if optimized is None:
        session = _loaded(model)
    else:
        try:
            # The session that runs the smoke sample also writes the graph it runs, which
            # the audit reads: one load, not two.
            session = make_session(model, optimized_path=optimized, config=OPTIMIZED_CONFIG)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class
            logger.debug("optimized graph not written (%s); verifying without the audit", exc)
            optimized.unlink(missing_ok=True)
            session = _loaded(model)
    try:
        outputs = session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - as above
        raise VerificationError(
            f"onnxruntime cannot run the converted model: {describe_error(exc)}"
        ) from None
    for meta, array in zip(session.get_outputs(), outputs, strict=True):
        if meta.name in nonfinite_in_float or not isinstance(array, np.ndarray):
            continue  # sequences and absent optionals hold no values to check here
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise VerificationError(
                f"The converted model's output '{meta.name}' holds NaN or Inf on the smoke "
                "sample."
            )
    return written


def _loaded(model: bytes | str, **options: Any):
    """An onnxruntime session of `model`, made with `make_session`'s `options`.

    Raises:
        VerificationError: onnxruntime cannot load the model (the one wording every check
            uses).
    """
    try:
        return make_session(model, **options)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class
        raise VerificationError(
            f"onnxruntime cannot load the converted model: {describe_error(exc)}"
        ) from None


def verify_loads(model: str) -> None:
    """Checks a model saved with external data by the ONNX checker and an onnxruntime load.

    No sample is run, and the session is made with prepacking off: onnxruntime then maps
    the weights from the data file instead of reading and repacking every one of them, so
    the check costs about the graph, not the weights (on the 3 GB bench decoder's 0.5 GB
    int4 output, 0.1 s against 2.7 s for a session that runs one sample). What it checks:
    the checker, and that onnxruntime resolves every node to a kernel with the types and
    shapes it was given (graph optimizations on, as for a real run).

    Raises:
        VerificationError: with the check that failed and the checker's or onnxruntime's
            words.
    """
    _check(model)
    _loaded(model, quiet=True, config=NO_PREPACKING)


def _check(model: bytes | str) -> None:
    """The ONNX checker on `model`; a path lets it read external data and pass 2 GB.

    Bytes go to the checker as they are: handed a parsed protobuf, it serializes it back
    to bytes first (24 ms of CPU on a 12 MB int8 ResNet-style CNN, against 2 ms).
    """
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise VerificationError(
            f"The converted model fails the ONNX checker: {describe_error(exc)}"
        ) from None


NO_PREPACKING = {"session.disable_prepacking": "1"}
"""A session that maps external weights as they are (load only: running it is slow)."""


def verify_structure(model: bytes | str, *, reference: bytes | str | None = None) -> None:
    """Checks a model that cannot be run: checker, strict shape inference, an optimized load.

    The fallback when no sample can run the float model (dynamic dims the smoke sample
    guesses wrong, a state input zeros do not fit): what can be told without running it.
    onnxruntime creates the session with every graph optimization on, so the fusions and
    kernel choices are made as they would be for a real run. Strict shape inference that
    fails on the float `reference` as well says nothing about the conversion.

    Raises:
        VerificationError: with the check that failed and the checker's or onnxruntime's
            words.
    """
    _check(model)
    problem = _strict_inference_problem(model)
    if problem is not None and (
        reference is None or _strict_inference_problem(reference) is None
    ):
        raise VerificationError(f"The converted model fails strict shape inference: {problem}")
    _loaded(model, optimize=True, quiet=True)


def _strict_inference_problem(model: bytes | str) -> str | None:
    """What strict shape and type inference objects to in `model`, or None."""
    try:
        if isinstance(model, bytes):
            onnx.shape_inference.infer_shapes(
                onnx.load_model_from_string(model), check_type=True, strict_mode=True
            )
        else:  # by path: the model may be over protobuf's 2 GB
            with tempfile.TemporaryDirectory() as folder:
                onnx.shape_inference.infer_shapes_path(
                    model,
                    str(Path(folder) / "inferred.onnx"),
                    check_type=True,
                    strict_mode=True,
                )
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        return describe_error(exc)
    return None
