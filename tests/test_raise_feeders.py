"""The raise phase walks back from a raised layer to the layer that writes its input.

Raised, a layer reads its input float only back to the layer that writes it; raising that
one too removes the rounding of its output, which alone it cannot (the int8 layer after it
reads it rounded). `feeding_layer` finds it through the ops without weights between them.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qconvert.pipelines.raise_phase import feeding_layer
from qconvert.testing._build import checked_model


def _model(text: str, inits: dict) -> ir.Model:
    """The model, each node named after its first output."""
    proto = checked_model(text, inits)
    for node in proto.graph.node:
        node.name = node.output[0]
    return ir.from_proto(proto)


def test_the_feeding_layer_is_found_through_silu_and_split():
    rng = np.random.default_rng(0)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        chain (float[1,4,8,8] input) => (float[1,2,8,8] output) {
            a = Conv <pads = [1, 1, 1, 1]> (input, w1)
            a_gate = Sigmoid (a)
            a_act = Mul (a, a_gate)
            b = Conv (a_act, w2)
            left, right = Split <axis = 1> (b, split)
            output = Conv (left, w3)
        }
    """
    model = _model(
        text,
        {
            "w1": rng.standard_normal((4, 4, 3, 3)).astype(np.float32),
            "w2": rng.standard_normal((4, 4, 1, 1)).astype(np.float32),
            "w3": rng.standard_normal((2, 2, 1, 1)).astype(np.float32),
            "split": np.array([2, 2], np.int64),
        },
    )
    assert feeding_layer(model, "b") == "a"  # through SiLU's Sigmoid and Mul
    assert feeding_layer(model, "output") == "b"  # through a Split
    assert feeding_layer(model, "a") is None  # reads the graph input


def test_two_layers_feeding_one_input_are_no_single_feeder():
    rng = np.random.default_rng(1)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        join (float[1,4,8,8] input) => (float[1,4,8,8] output) {
            a = Conv (input, w1)
            b = Conv (input, w2)
            both = Add (a, b)
            output = Conv (both, w3)
        }
    """
    weights = {
        name: rng.standard_normal((4, 4, 1, 1)).astype(np.float32)
        for name in ("w1", "w2", "w3")
    }
    model = _model(text, weights)
    assert feeding_layer(model, "output") is None
