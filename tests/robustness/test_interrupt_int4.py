"""Ctrl-C and SIGTERM while an int4 model in external data is rounded and written."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qconvert import testing
from robustness.signals import signals_as_from_a_terminal

# The rounding made slow (a pause between chunks of 256 values) so that the signal lands
# while the save's threads are busy: the writer, the lookahead and the chunk pieces.
CHILD = """
import sys, time
from qconvert import blockwise
walk = blockwise.column_chunks
def slow(*args, **kwargs):
    for item in walk(*args, **kwargs):
        time.sleep(0.02)
        yield item
blockwise.column_chunks = slow
blockwise.NEAREST_CHUNK_VALUES = 256
from qconvert.cli import main
main(sys.argv[1:])
"""


def _chain(width: int = 256, layers: int = 4):
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(
            (rng.standard_normal((width, width)) * 0.05).astype(np.float32), f"w{i}"
        )
        for i in range(layers)
    ]
    nodes = [
        helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"w{i}"], [f"h{i}"])
        for i in range(layers)
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, width])],
        [helper.make_tensor_value_info(f"h{layers - 1}", TensorProto.FLOAT, [2, width])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize(
    ("signum", "code", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["sigint", "sigterm"],
)
def test_signal_during_the_threaded_int4_save_leaves_nothing(tmp_path, signum, code, word):
    (tmp_path / "in").mkdir()
    path = testing.save_with_external_data(_chain(), tmp_path / "in" / "chain.onnx")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    command = ["quantize", str(path), "--scheme", "int4", "-o", str(out_dir / "q.onnx")]
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD, *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=signals_as_from_a_terminal,
    )
    deadline = time.monotonic() + 120
    # the save stages its files in a temporary folder beside the output
    while not list(out_dir.iterdir()) and process.poll() is None:
        assert time.monotonic() < deadline, "the save never started"
        time.sleep(0.005)
    time.sleep(0.2)  # into the rounding
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert err.strip() == f"Error: {word}; no output was written."
    assert list(out_dir.iterdir()) == []
