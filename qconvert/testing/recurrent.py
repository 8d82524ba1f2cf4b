"""Recurrent graphs: one LSTM, GRU or RNN over a sequence."""

from __future__ import annotations

import numpy as np
import onnx

from qconvert.testing._build import checked_model, random_weights


def lstm(input_size: int = 16, hidden: int = 32, *, seed: int = 0) -> onnx.ModelProto:
    """One forward LSTM over a sequence: input [T,N,input_size] -> Y [T,1,N,hidden]."""
    rng = np.random.default_rng(seed)
    h, k = hidden, input_size
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        lstm (float[T,N,{k}] input) => (float[T,1,N,{h}] output) {{
            output = LSTM <hidden_size = {h}> (input, w, r, b)
        }}
    """
    return checked_model(
        text,
        {
            "w": random_weights(rng, 1, 4 * h, k, scale=0.3),
            "r": random_weights(rng, 1, 4 * h, h, scale=0.2),
            "b": random_weights(rng, 1, 8 * h, scale=0.1),
        },
    )


_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def recurrent(
    op: str = "LSTM",
    input_size: int = 16,
    hidden: int = 32,
    *,
    directions: int = 1,
    seed: int = 0,
) -> onnx.ModelProto:
    """One LSTM, GRU or RNN over a sequence: input [T,N,input_size] -> Y [T,D,N,hidden].

    W is [D, gates x hidden, input_size] and R [D, gates x hidden, hidden], as ONNX lays
    them out; `directions` 2 makes it bidirectional. Each row of W has its own size
    (0.05 to 0.5), as trained gate units do.
    """
    rng = np.random.default_rng(seed)
    h, k, d, rows = hidden, input_size, directions, _GATES[op] * hidden
    direction = "bidirectional" if d == 2 else "forward"
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        recurrent (float[T,N,{k}] input) => (float[T,{d},N,{h}] output) {{
            output = {op} <hidden_size = {h}, direction = "{direction}"> (input, w, r, b)
        }}
    """
    row_sizes = rng.uniform(0.05, 0.5, (d, rows, 1)).astype(np.float32)
    return checked_model(
        text,
        {
            "w": random_weights(rng, d, rows, k, scale=1.0) * row_sizes,
            "r": random_weights(rng, d, rows, h, scale=0.2),
            "b": random_weights(rng, d, 2 * rows, scale=0.1),
        },
    )
