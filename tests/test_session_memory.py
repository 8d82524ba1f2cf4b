"""The memory a session is built on (`runtime.release_freed_memory`).

onnx_ir graphs are reference cycles (a node knows its graph, a value its producer), so a
dropped model is freed only by Python's cycle collector, which runs rarely. Before each
session is built, the models the pipeline dropped are collected and glibc hands their
pages back: the session's memory then comes on top of what is alive, not of everything
dropped since the last collection.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import onnx
import onnx_ir as ir

from qconvert import runtime, testing


def _dropped_model_is_collected_by(build) -> bool:
    proto = testing.matmul_add(k=64, n=32)
    was_enabled = gc.isenabled()
    gc.disable()  # the collector must not run on its own during the test
    try:
        model = ir.serde.deserialize_model(proto)
        graph = weakref.ref(model.graph)
        del model
        still_there = graph() is not None  # the cycles keep it past its last reference
        build(proto.SerializeToString())
        return still_there and graph() is None
    finally:
        if was_enabled:
            gc.enable()


def test_a_dropped_model_is_freed_before_the_next_session_is_built():
    assert _dropped_model_is_collected_by(runtime.make_session)


def test_without_the_release_a_dropped_model_outlives_the_session(monkeypatch):
    monkeypatch.setattr(runtime, "release_freed_memory", lambda: None)
    assert not _dropped_model_is_collected_by(runtime.make_session)


def test_sessions_work_where_the_c_library_has_no_malloc_trim(monkeypatch):
    monkeypatch.setattr(runtime, "_malloc_trim", None)
    proto = testing.matmul_add(k=8, n=4)
    session = runtime.make_session(proto.SerializeToString(), threads=1)
    feeds = testing.random_inputs(proto, batch=2, seed=0)
    (out,) = session.run(None, feeds)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    expected = feeds["input"] @ weights["w"] + weights["b"]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
