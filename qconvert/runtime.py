"""The one place that creates onnxruntime sessions, so options stay consistent."""

from __future__ import annotations

import onnxruntime as ort


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
