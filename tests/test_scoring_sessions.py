"""Sessions that only score leave out onnxruntime's blocked-layout rewrite.

`runtime.NCHWC_TRANSFORMER` copies every float Conv weight into the blocked layout while
a session is built and holds the copies. The recipe's held-out scoring and the range
check's evaluator build one float reference and a session per candidate; both sides are
built without it, so their scores compare like with like.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qconvert import handed_weights, sensitivity, testing
from qconvert.passes import prepare
from qconvert.pipelines import held_out
from qconvert.plan.static import make_plan
from qconvert.runtime import make_session
from qconvert.schemes import SCHEMES

_BLOCKED = "com.microsoft.nchwc"


def _blocked_nodes(proto: onnx.ModelProto, tmp_path, **options) -> int:
    path = tmp_path / "optimized.onnx"
    make_session(proto.SerializeToString(), optimized_path=path, **options)
    return sum(node.domain == _BLOCKED for node in onnx.load(path).graph.node)


def test_reorder_layout_off_leaves_float_convs_in_their_layout(tmp_path):
    proto = testing.conv_bn_relu(channels=16)
    if not _blocked_nodes(proto, tmp_path):
        pytest.skip("this onnxruntime build has no blocked layout for this CPU")
    assert _blocked_nodes(proto, tmp_path, reorder_layout=False) == 0


def _recording(monkeypatch, module) -> list[dict]:
    calls: list[dict] = []
    real = module.make_session

    def record(model, **options):
        calls.append(options)
        return real(model, **options)

    monkeypatch.setattr(module, "make_session", record)
    return calls


def _prepared_and_feeds(seed: int = 0):
    proto = testing.conv_bn_relu(channels=16, seed=seed)
    prepared = prepare(ir.serde.deserialize_model(proto), min_opset=1)
    rng = np.random.default_rng(seed)
    feeds = [{"input": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    return prepared, feeds


def test_held_out_scoring_builds_both_sides_without_the_blocked_layout(monkeypatch):
    calls = _recording(monkeypatch, held_out)
    prepared, feeds = _prepared_and_feeds()
    graph, weights = handed_weights.serialized(prepared)
    scorer = held_out.HeldOut(graph, feeds, weights=weights)
    fidelity = scorer.score(graph, weights)

    assert len(calls) == 2
    assert all(call.get("reorder_layout") is False for call in calls)
    # The float model scored against itself: the same numbers on both sides.
    assert fidelity.sqnr_db > 100


def test_evaluator_builds_reference_and_candidates_without_the_blocked_layout(monkeypatch):
    calls = _recording(monkeypatch, sensitivity)
    prepared, feeds = _prepared_and_feeds(seed=1)
    graph, weights = handed_weights.serialized(prepared)
    evaluator = sensitivity.Evaluator(graph, prepared, feeds, weights=weights)
    score = evaluator.score(make_plan(prepared, SCHEMES["int8"], {}))

    assert len(calls) == 2
    assert all(call.get("reorder_layout") is False for call in calls)
    assert score.sqnr_db > 100  # no ranges, nothing quantized: the float model again
