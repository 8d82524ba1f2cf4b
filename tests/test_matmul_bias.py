"""Preparation: a rank-2 MatMul's (1, N) bias becomes (N,); other shapes stay as written.

The end-to-end case (one QGemm instead of a float Gemm) is in `test_float_outputs`.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper as nh

from qconvert.passes.prepare import prepare
from qconvert.runtime import make_session


def _prepared(text: str, bias: np.ndarray) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    rng = np.random.default_rng(3)
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(
        [
            nh.from_array((rng.standard_normal((8, 4)) * 0.5).astype(np.float32), "w"),
            nh.from_array(bias.astype(np.float32), "b"),
        ]
    )
    onnx.checker.check_model(model, full_check=True)
    prepared = prepare(ir.serde.deserialize_model(model), min_opset=17)
    return model, ir.serde.serialize_model(prepared)


def _bias_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    adds = [node for node in model.graph.node if node.op_type == "Add"]
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    return {node.name: inits[node.input[1]] for node in adds}


def _same_outputs(original: onnx.ModelProto, prepared: onnx.ModelProto, shape) -> None:
    feeds = {"x": np.random.default_rng(4).standard_normal(shape).astype(np.float32)}
    runs = [make_session(m.SerializeToString()).run(None, feeds) for m in (original, prepared)]
    for a, b in zip(*runs, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_a_row_bias_read_by_one_add_is_reshaped_in_place():
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        dense (float[N,8] x) => (float[N,4] y) {
            p = MatMul (x, w)
            y = Add (p, b)
        }
    """
    original, prepared = _prepared(text, np.arange(4).reshape(1, 4))
    assert list(_bias_shapes(prepared).values()) == [[4]]
    _same_outputs(original, prepared, (3, 8))


def test_a_shared_row_bias_gets_a_vector_copy():
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        dense (float[N,8] x) => (float[N,4] y, float[N,4] z) {
            p = MatMul (x, w)
            y = Add (p, b)
            p2 = MatMul (x, w)
            q = Relu (p2)
            z = Add (q, b)
        }
    """
    original, prepared = _prepared(text, np.arange(4).reshape(1, 4))
    shapes = {tuple(s) for s in _bias_shapes(prepared).values()}
    assert shapes == {(4,), (1, 4)}  # the Relu's Add is no MatMul's bias: it keeps (1, 4)
    _same_outputs(original, prepared, (3, 8))


@pytest.mark.parametrize(
    ("inputs", "outputs", "bias_shape", "feed_shape"),
    [
        # A 3-D layer: the pair is left as the exporter wrote it (see the pass's module).
        ("float[N,5,8] x", "float[N,5,4] y", (1, 1, 4), (2, 5, 8)),
        # A 1-D input: the (1, 4) bias is what makes the output 2-D.
        ("float[8] x", "float[1,4] y", (1, 4), (8,)),
    ],
)
def test_other_ranks_keep_their_bias(inputs, outputs, bias_shape, feed_shape):
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        dense ({inputs}) => ({outputs}) {{
            p = MatMul (x, w)
            y = Add (p, b)
        }}
    """
    original, prepared = _prepared(text, np.arange(4).reshape(bias_shape))
    assert list(_bias_shapes(prepared).values()) == [list(bias_shape)]
    _same_outputs(original, prepared, feed_shape)
