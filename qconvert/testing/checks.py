"""Numeric and structural checks: op counts, output SQNR, onnxruntime's optimized graph."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from qconvert.metrics import sqnr_db
from qconvert.runtime import make_session


def count_ops(model: onnx.ModelProto | str | Path) -> Counter:
    """Op types of the main graph, with counts."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load_model(str(model), load_external_data=False)
    return Counter(node.op_type for node in model.graph.node)


def output_sqnr(
    reference: onnx.ModelProto | str | Path,
    candidate: onnx.ModelProto | str | Path,
    feeds_list: list[dict[str, np.ndarray]],
) -> float:
    """SQNR (dB) of the candidate's first output against the reference's, over all feeds."""
    sessions = [make_session(_as_bytes_or_path(m)) for m in (reference, candidate)]
    signal = noise = 0.0
    for feeds in feeds_list:
        ref, cand = (np.asarray(s.run(None, feeds)[0], dtype=np.float64) for s in sessions)
        signal += float(np.sum(ref**2))
        noise += float(np.sum((ref - cand) ** 2))
    return sqnr_db(signal, noise)


def optimized_ops(model: str | Path, folder: str | Path) -> Counter:
    """Op types onnxruntime actually runs after its graph optimizations (fusions, folding)."""
    optimized = optimized_model(model, folder)
    return Counter(node.op_type for node in optimized.graph.node)


def optimized_model(model: str | Path, folder: str | Path) -> onnx.ModelProto:
    """The graph onnxruntime's CPU provider runs after its optimizations, as a model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
    ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return onnx.load_model(options.optimized_model_filepath, load_external_data=False)


def _as_bytes_or_path(model: onnx.ModelProto | str | Path) -> bytes | str:
    return model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
