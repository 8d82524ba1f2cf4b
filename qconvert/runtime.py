"""The one place that creates onnxruntime sessions, so options stay consistent."""

from __future__ import annotations

import re

import onnxruntime as ort

_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")


def make_session(
    model: bytes | str, *, threads: int = 0, optimize: bool = True
) -> ort.InferenceSession:
    """A CPU session for `model` (bytes or a path); 0 threads lets onnxruntime choose."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def describe_error(error: BaseException) -> str:
    """onnxruntime's message for `error` on one line, without its status-code prefix."""
    text = (str(error).strip() or type(error).__name__).splitlines()[0]
    return _ORT_PREFIX.sub("", text)
