"""Mutation fuzzing of model files: every mutant is either quantized soundly or refused with
a qconvert error (exit 3), never an uncaught exception, never a partial output.

`make fuzz` runs the same properties with many more examples (QCONVERT_FUZZ_EXAMPLES).
"""

from __future__ import annotations

import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qconvert
from qconvert import testing
from qconvert.errors import QconvertError
from robustness.fuzzing import fuzz_settings

FUZZ = fuzz_settings(60)

_MODEL = testing.conv_bn_relu(channels=4)
_BYTES = _MODEL.SerializeToString()


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calib")
    return testing.write_samples(
        folder, [testing.random_inputs(_MODEL, seed=i) for i in range(2)]
    )


def _attempt(tmp_path, data: bytes, calib) -> None:
    model = tmp_path / "mutant.onnx"
    model.write_bytes(data)
    out = tmp_path / "q.onnx"
    if out.exists():
        out.unlink()
    try:
        qconvert.quantize(model, out, data=calib)
    except QconvertError as error:
        assert error.exit_code in (3, 4), error
        assert "\n" not in str(error)
        assert not out.exists()
    else:
        assert out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".q.onnx")) == []


@FUZZ
@given(cut=st.integers(min_value=0, max_value=len(_BYTES) - 1))
def test_truncated_files(tmp_path, calib, cut):
    _attempt(tmp_path, _BYTES[:cut], calib)


@FUZZ
@given(
    flips=st.lists(
        st.tuples(st.integers(0, len(_BYTES) - 1), st.integers(1, 255)), min_size=1, max_size=8
    )
)
def test_flipped_bytes(tmp_path, calib, flips):
    data = bytearray(_BYTES)
    for position, mask in flips:
        data[position] ^= mask
    _attempt(tmp_path, bytes(data), calib)


_DROPS = (
    "initializer",
    "node",
    "input",
    "output",
    "node_input",
    "attribute",
    "opset",
    "value_type",
)


@FUZZ
@given(drop=st.sampled_from(_DROPS), index=st.integers(0, 20))
def test_dropped_fields(tmp_path, calib, drop, index):
    model = onnx.ModelProto()
    model.CopyFrom(_MODEL)
    graph = model.graph

    def pick(container):
        return index % len(container) if len(container) else None

    if drop == "initializer" and (i := pick(graph.initializer)) is not None:
        del graph.initializer[i]
    elif drop == "node" and (i := pick(graph.node)) is not None:
        del graph.node[i]
    elif drop == "input" and (i := pick(graph.input)) is not None:
        del graph.input[i]
    elif drop == "output" and (i := pick(graph.output)) is not None:
        del graph.output[i]
    elif drop == "node_input" and (i := pick(graph.node)) is not None:
        node = graph.node[i]
        if node.input:
            del node.input[index % len(node.input)]
    elif drop == "attribute":
        nodes = [n for n in graph.node if n.attribute]
        if nodes:
            node = nodes[index % len(nodes)]
            del node.attribute[index % len(node.attribute)]
    elif drop == "opset":
        del model.opset_import[:]
    elif drop == "value_type":
        graph.input[0].type.Clear()
    _attempt(tmp_path, model.SerializeToString(), calib)
