"""Tiny models built in code, and numeric assertions, for qconvert's tests and for users'.

Example::

    from qconvert import testing
    model = testing.conv_bn_relu()
    testing.save(model, tmp_path / "model.onnx")
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper

from qconvert.metrics import sqnr_db
from qconvert.runtime import make_session


def _weights(rng: np.random.Generator, *shape: int, scale: float = 0.5) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _model(text: str, initializers: dict[str, np.ndarray]) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(
        onnx.numpy_helper.from_array(array, name) for name, array in initializers.items()
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def conv_bn_relu(channels: int = 8, *, seed: int = 0) -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu -> MaxPool -> Flatten -> Gemm, input [N,3,8,8]."""
    rng = np.random.default_rng(seed)
    c = channels
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        conv_bn_relu (float[N,3,8,8] input) => (float[N,10] logits) {
            conv = Conv <pads = [1,1,1,1], kernel_shape = [3,3]> (input, conv_w, conv_b)
            bn = BatchNormalization (conv, bn_scale, bn_bias, bn_mean, bn_var)
            relu = Relu (bn)
            pool = MaxPool <kernel_shape = [2,2], strides = [2,2]> (relu)
            flat = Flatten (pool)
            logits = Gemm <transB = 1> (flat, fc_w, fc_b)
        }
    """
    return _model(
        text,
        {
            "conv_w": _weights(rng, c, 3, 3, 3),
            "conv_b": _weights(rng, c, scale=0.1),
            "bn_scale": (1 + 0.2 * rng.standard_normal(c)).astype(np.float32),
            "bn_bias": _weights(rng, c, scale=0.1),
            "bn_mean": _weights(rng, c, scale=0.1),
            "bn_var": (0.5 + rng.random(c)).astype(np.float32),
            "fc_w": _weights(rng, 10, c * 16, scale=0.1),
            "fc_b": _weights(rng, 10, scale=0.1),
        },
    )


def matmul_add(k: int = 16, n: int = 8, *, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """MatMul with a constant weight, then Add: input [N,4,K] -> [N,4,n]."""
    rng = np.random.default_rng(seed)
    text = f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        matmul_add (float[N,4,{k}] input) => (float[N,4,{n}] output) {{
            mm = MatMul (input, w)
            output = Add (mm, b)
        }}
    """
    return _model(text, {"w": _weights(rng, k, n), "b": _weights(rng, n, scale=0.1)})


def embedding_mlp(
    vocab: int = 50, d: int = 64, hidden: int = 96, classes: int = 10, *, seed: int = 0
) -> onnx.ModelProto:
    """Gather (embedding table) -> MatMul+Add -> Relu -> MatMul -> mean over tokens -> Gemm.

    ids int64 [N, T] -> logits [N, classes]; the Gemm has transB and a bias, so every form
    int4 writes (GatherBlockQuantized, MatMulNBits, MatMulNBits with a bias) appears.
    """
    rng = np.random.default_rng(seed)
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        embedding_mlp (int64[N,T] ids) => (float[N,{classes}] logits) {{
            emb = Gather <axis = 0> (table, ids)
            h0 = MatMul (emb, w1)
            h1 = Add (h0, b1)
            h2 = Relu (h1)
            h3 = MatMul (h2, w2)
            pooled = ReduceMean <keepdims = 0, axes = [1]> (h3)
            logits = Gemm <transB = 1> (pooled, w3, b3)
        }}
    """
    return _model(
        text,
        {
            "table": _weights(rng, vocab, d),
            "w1": _weights(rng, d, hidden, scale=0.2),
            "b1": _weights(rng, hidden, scale=0.1),
            "w2": _weights(rng, hidden, d, scale=0.2),
            "w3": _weights(rng, classes, d, scale=0.2),
            "b3": _weights(rng, classes, scale=0.1),
        },
    )


def tied_decoder(
    vocab: int = 48, d: int = 64, hidden: int = 96, *, head: str = "matmul", seed: int = 0
) -> onnx.ModelProto:
    """Embedding -> residual MLP -> output projection tied to the embedding table.

    ids int64 [N, T]. `head="matmul"`: logits [N, T, vocab] from MatMul with a (d, vocab)
    initializer holding the table's transpose, as exporters write a tied projection after
    constant folding; `head="gemm"`: logits [N, vocab] of the mean token from Gemm with
    transB on the table itself.
    """
    rng = np.random.default_rng(seed)
    table = _weights(rng, vocab, d)
    if head == "matmul":
        tail, out, extra = (
            "logits = MatMul (x, table_t)",
            f"float[N,T,{vocab}]",
            {"table_t": table.T.copy()},
        )
    else:
        tail = (
            "pooled = ReduceMean <keepdims = 0, axes = [1]> (x)\n"
            "            logits = Gemm <transB = 1> (pooled, table)"
        )
        out, extra = f"float[N,{vocab}]", {}
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        tied_decoder (int64[N,T] ids) => ({out} logits) {{
            emb = Gather <axis = 0> (table, ids)
            h0 = MatMul (emb, w1)
            h1 = Relu (h0)
            h2 = MatMul (h1, w2)
            x = Add (emb, h2)
            {tail}
        }}
    """
    return _model(
        text,
        {
            "table": table,
            "w1": _weights(rng, d, hidden, scale=0.2),
            "w2": _weights(rng, hidden, d, scale=0.2),
            **extra,
        },
    )


def matmul_layernorm_exp(k: int = 16, *, seed: int = 0) -> onnx.ModelProto:
    """MatMul -> LayerNormalization -> Softmax, and an Exp branch: input [N,K] -> 2 outputs.

    The fp16 scheme keeps Exp float32 (it overflows float16) and runs the rest in float16.
    """
    rng = np.random.default_rng(seed)
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        matmul_layernorm_exp (float[N,{k}] input)
            => (float[N,{k}] probs, float[N,{k}] growth) {{
            mm = MatMul (input, w)
            norm = LayerNormalization <axis = -1> (mm, gamma, beta)
            probs = Softmax <axis = -1> (norm)
            growth = Exp (mm)
        }}
    """
    return _model(
        text,
        {
            "w": _weights(rng, k, k, scale=0.3),
            "gamma": (1 + 0.1 * rng.standard_normal(k)).astype(np.float32),
            "beta": _weights(rng, k, scale=0.1),
        },
    )


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
    return _model(
        text,
        {
            "w": _weights(rng, 1, 4 * h, k, scale=0.3),
            "r": _weights(rng, 1, 4 * h, h, scale=0.2),
            "b": _weights(rng, 1, 8 * h, scale=0.1),
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
    return _model(
        text,
        {
            "w": _weights(rng, d, rows, k, scale=1.0) * row_sizes,
            "r": _weights(rng, d, rows, h, scale=0.2),
            "b": _weights(rng, d, 2 * rows, scale=0.1),
        },
    )


def conv_and_matmul_outputs(*, seed: int = 0) -> onnx.ModelProto:
    """A Conv and a MatMul that each write a graph output (no op reads them afterwards)."""
    rng = np.random.default_rng(seed)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        conv_and_matmul_outputs (float[N,3,8,8] input, float[N,16] vector)
            => (float[N,4,8,8] feature, float[N,8] projection) {
            feature = Conv <pads = [1,1,1,1]> (input, w, b)
            projection = MatMul (vector, m)
        }
    """
    return _model(
        text,
        {
            "w": _weights(rng, 4, 3, 3, 3),
            "b": _weights(rng, 4, scale=0.1),
            "m": _weights(rng, 16, 8),
        },
    )


def loop_matmul_relu(trips: int = 3, *, seed: int = 0) -> onnx.ModelProto:
    """A Loop of `trips` iterations, x = Relu(x @ w), on input [N,8].

    The weight `w` is a main-graph initializer the body reads from the outer scope.
    """
    from onnx import helper

    body = [
        helper.make_node("MatMul", ["x_in", "w"], ["y"], name="body_mm"),
        helper.make_node("Relu", ["y"], ["x_out"], name="body_relu"),
    ]
    return _loop("loop_matmul_relu", body, trips, seed, {})


def loop_matmul_scaled_sigmoid(trips: int = 2, *, seed: int = 0) -> onnx.ModelProto:
    """A Loop of `trips` iterations, x = Sigmoid(0.5 * (x @ w)): a Mul the planner folds."""
    from onnx import helper

    body = [
        helper.make_node("MatMul", ["x_in", "w"], ["y"], name="body_mm"),
        helper.make_node("Mul", ["y", "half"], ["z"], name="body_scale"),
        helper.make_node("Sigmoid", ["z"], ["x_out"], name="body_sigmoid"),
    ]
    return _loop("loop_scaled", body, trips, seed, {"half": np.array(0.5, np.float32)})


def _loop(
    name: str, body_nodes: list, trips: int, seed: int, constants: dict[str, np.ndarray]
) -> onnx.ModelProto:
    """A Loop over `body_nodes` (x_in -> x_out on [N,8]) reading outer `w` and `constants`."""
    from onnx import TensorProto, helper

    weights = _weights(np.random.default_rng(seed), 8, 8, scale=0.3)
    body = helper.make_graph(
        [
            *body_nodes,
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, ["N", 8]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, ["N", 8]),
        ],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "input"], ["output"], body=body, name="loop")],
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 8])],
        [
            onnx.numpy_helper.from_array(weights, "w"),
            onnx.numpy_helper.from_array(np.array(trips, np.int64), "trips"),
            *(onnx.numpy_helper.from_array(v, k) for k, v in constants.items()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def integer_only(*, opset: int = 17) -> onnx.ModelProto:
    """A model with no float tensor at all: int64 input -> Add -> int64 output."""
    text = f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        integer_only (int64[N,4] input) => (int64[N,4] output) {{
            output = Add (input, offset)
        }}
    """
    return _model(text, {"offset": np.arange(4, dtype=np.int64)})


def sequence_mlp(k: int = 8, hidden: int = 16, *, seed: int = 0) -> onnx.ModelProto:
    """MatMul -> Relu -> MatMul on tokens: input [N,L,K] with a dynamic length L."""
    rng = np.random.default_rng(seed)
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        sequence_mlp (float[N,L,{k}] tokens) => (float[N,L,{k}] output) {{
            h = MatMul (tokens, w1)
            r = Relu (h)
            output = MatMul (r, w2)
        }}
    """
    return _model(
        text, {"w1": _weights(rng, k, hidden), "w2": _weights(rng, hidden, k, scale=0.2)}
    )


def two_inputs(k: int = 8, *, seed: int = 0) -> onnx.ModelProto:
    """Two inputs a, b [N,K], each through a MatMul, then added: [N,K]."""
    rng = np.random.default_rng(seed)
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        two_inputs (float[N,{k}] a, float[N,{k}] b) => (float[N,{k}] output) {{
            ha = MatMul (a, wa)
            hb = MatMul (b, wb)
            output = Add (ha, hb)
        }}
    """
    return _model(text, {"wa": _weights(rng, k, k), "wb": _weights(rng, k, k)})


def sensitive_mlp(*, seed: int = 0) -> onnx.ModelProto:
    """Gemm -> Relu -> Gemm -> Relu -> Gemm, input [N,16] -> [N,10].

    The middle Gemm (`g2`) is made sensitive to quantization by construction.

    Row 0 of g2's weight (the input feature fed by g1's channel 0, which g1 keeps near zero)
    is 1000 times the rest, so each output channel's int8 weight scale is set by it and the
    ordinary weights round to 0: quantizing g2 alone wrecks the output, while g1 and g3
    quantize well.
    """
    rng = np.random.default_rng(seed)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        sensitive_mlp (float[N,16] input) => (float[N,10] output) {
            h1 = Gemm <alpha = 1.0> (input, w1, b1)
            r1 = Relu (h1)
            h2 = Gemm <alpha = 1.0> (r1, w2, b2)
            r2 = Relu (h2)
            output = Gemm <alpha = 1.0> (r2, w3, b3)
        }
    """
    w1 = _weights(rng, 16, 16)
    w1[:, 0] *= 1e-4
    w2 = _weights(rng, 16, 16)
    w2[0] *= 1000.0
    model = _model(
        text,
        {
            "w1": w1,
            "b1": np.zeros(16, np.float32),
            "w2": w2,
            "b2": _weights(rng, 16, scale=0.1),
            "w3": _weights(rng, 16, 10),
            "b3": _weights(rng, 10, scale=0.1),
        },
    )
    for node, name in zip(model.graph.node, ("g1", "r1", "g2", "r2", "g3"), strict=True):
        node.name = name
    return model


def conv_relu_conv(
    w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, *, clip: bool = False, group2: int = 1
) -> onnx.ModelProto:
    """Conv(w1, b1) -> Relu (or Clip(0, 6)) -> Conv(w2, group2), 3x3 weights.

    Input [N, C, 8, 8]; the Convs are named `first` and `second`.
    """
    act = "Clip (h, lo, hi)" if clip else "Relu (h)"
    c_in, c_out = w1.shape[1], w2.shape[0]
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        conv_relu_conv (float[N,{c_in},8,8] input) => (float[N,{c_out},8,8] output) {{
            h = Conv <pads = [1,1,1,1], kernel_shape = [3,3]> (input, w1, b1)
            a = {act}
            output = Conv <pads = [1,1,1,1], kernel_shape = [3,3], group = {group2}> (a, w2)
        }}
    """
    initializers = {"w1": w1, "b1": b1, "w2": w2}
    if clip:
        initializers.update(lo=np.float32(0.0), hi=np.float32(6.0))
    model = _model(text, {k: np.asarray(v, np.float32) for k, v in initializers.items()})
    model.graph.node[0].name, model.graph.node[2].name = "first", "second"
    return model


def pointwise_hardswish_depthwise(
    spread: float = 50.0, channels: int = 8, *, seed: int = 0
) -> onnx.ModelProto:
    """Conv 1x1 -> Mul, Add (scalars) -> HardSwish -> Mul, Add -> depthwise 3x3 -> Conv 1x1.

    PP-LCNet's block: a pointwise Conv, the learnable affine a * x + b around a float
    HardSwish, then a depthwise Conv. The pointwise Conv's output channels differ in range
    by `spread` (channel c's weights scaled by spread**(-c / (channels - 1))), and the
    depthwise Conv gains back what each channel lost, so every channel matters equally at
    the output. Input [N, 4, 16, 16]; output [N, 4, 16, 16].
    """
    rng = np.random.default_rng(seed)
    gains = spread ** (-np.arange(channels) / (channels - 1))
    w1 = _weights(rng, channels, 4, 1, 1) * gains.reshape(-1, 1, 1, 1).astype(np.float32)
    w2 = _weights(rng, channels, 1, 3, 3) / gains.reshape(-1, 1, 1, 1).astype(np.float32)
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        pw_hswish_dw (float[N,4,16,16] input) => (float[N,4,16,16] output) {{
            h = Conv <kernel_shape = [1,1]> (input, w1, b1)
            s1 = Mul (h, a1)
            t1 = Add (s1, c1)
            g = HardSwish (t1)
            s2 = Mul (g, a2)
            t2 = Add (s2, c2)
            d = Conv <pads = [1,1,1,1], kernel_shape = [3,3], group = {channels}> (t2, w2)
            output = Conv <kernel_shape = [1,1]> (d, w3)
        }}
    """
    return _model(
        text,
        {
            "w1": w1,
            "b1": (0.1 * gains).astype(np.float32),
            "a1": np.float32(2.0),
            "c1": np.float32(0.5),
            "a2": np.float32(0.7),
            "c2": np.float32(-0.2),
            "w2": w2.astype(np.float32),
            "w3": _weights(rng, 4, channels, 1, 1),
        },
    )


def pointwise_two_depthwise(
    spread: float = 50.0, channels: int = 8, *, seed: int = 0
) -> onnx.ModelProto:
    """Conv 1x1 -> two depthwise Convs (3x3 and 5x5) -> Add -> Conv 1x1 (MixConv-style).

    The pointwise Conv's output channels differ in range by `spread` and the depthwise
    Convs gain back what each channel lost. Its output has two readers, so no Conv -> Conv
    pair exists for weight equalization. Input [N, 4, 16, 16]; output [N, 4, 16, 16].
    """
    rng = np.random.default_rng(seed)
    gains = (spread ** (-np.arange(channels) / (channels - 1))).reshape(-1, 1, 1, 1)
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        pw_two_dw (float[N,4,16,16] input) => (float[N,4,16,16] output) {{
            h = Conv <kernel_shape = [1,1]> (input, w1, b1)
            d = Conv <pads = [1,1,1,1], kernel_shape = [3,3], group = {channels}> (h, w2)
            e = Conv <pads = [2,2,2,2], kernel_shape = [5,5], group = {channels}> (h, w4)
            f = Add (d, e)
            output = Conv <kernel_shape = [1,1]> (f, w3)
        }}
    """
    return _model(
        text,
        {
            "w1": _weights(rng, channels, 4, 1, 1) * gains.astype(np.float32),
            "b1": (0.1 * gains.ravel() + 1.0).astype(np.float32),
            "w2": (_weights(rng, channels, 1, 3, 3) / gains).astype(np.float32),
            "w3": _weights(rng, 4, channels, 1, 1),
            "w4": (_weights(rng, channels, 1, 5, 5) / gains).astype(np.float32),
        },
    )


def gemm_bias(w: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    """Gemm <transB = 1> (input, w, b): input [N, K] -> [N, O], w [O, K]."""
    out, k = w.shape
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        gemm_bias (float[N,{k}] input) => (float[N,{out}] output) {{
            output = Gemm <transB = 1> (input, w, b)
        }}
    """
    model = _model(text, {"w": w.astype(np.float32), "b": b.astype(np.float32)})
    model.graph.node[0].name = "gemm"
    return model


def layernorm_matmul(
    gamma: np.ndarray, beta: np.ndarray, w: np.ndarray, w2: np.ndarray
) -> onnx.ModelProto:
    """LayerNormalization(gamma, beta) read by two MatMuls (w, w2), outputs added.

    Input [N, 4, K] -> [N, 4, n]; the transformer projection pattern.
    """
    k, n = w.shape
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        layernorm_matmul (float[N,4,{k}] input) => (float[N,4,{n}] output) {{
            x = LayerNormalization <axis = -1> (input, gamma, beta)
            p = MatMul (x, w)
            q = MatMul (x, w2)
            output = Add (p, q)
        }}
    """
    arrays = {"gamma": gamma, "beta": beta, "w": w, "w2": w2}
    return _model(text, {name: np.asarray(a, np.float32) for name, a in arrays.items()})


def detector_head(features: int = 16, classes: int = 4, *, seed: int = 0) -> onnx.ModelProto:
    """A detector's head: box coordinates in pixels (0..640) beside class scores (0..1).

    Both go into one tensor, as YOLO-style exporters write it: input [N,F] -> output
    [N,1,4+classes].
    """
    rng = np.random.default_rng(seed)
    width = 4 + classes
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        detector_head (float[N,{features}] input) => (float[N,1,{width}] output) {{
            hidden = MatMul (input, w_in)
            act = Relu (hidden)
            box_logits = MatMul (act, w_box)
            box_unit = Sigmoid (box_logits)
            boxes = Mul (box_unit, image_size)
            score_logits = MatMul (act, w_score)
            scores = Sigmoid (score_logits)
            joined = Concat <axis = 1> (boxes, scores)
            output = Reshape (joined, shape)
        }}
    """
    return _model(
        text,
        {
            "w_in": _weights(rng, features, 32, scale=0.4),
            "w_box": _weights(rng, 32, 4, scale=0.3),
            "w_score": _weights(rng, 32, classes, scale=0.6),
            "image_size": np.array(640.0, np.float32),
            "shape": np.array([-1, 1, width], np.int64),
        },
    )


def deep_residual_mlp(blocks: int = 1250, width: int = 8, *, seed: int = 0) -> onnx.ModelProto:
    """`blocks` residual blocks of MatMul -> Add (bias) -> Tanh -> Add (skip): 4 nodes each.

    Input [N,width]; a long graph (5,000 nodes at the default) to test that reports stay
    usable on big models. Tanh bounds each step, so values grow at most linearly.
    """
    rng = np.random.default_rng(seed)
    lines, initializers = [], {}
    previous = "input"
    for block in range(blocks):
        name = f"b{block}"
        lines += [
            f"{name}_mm = MatMul ({previous}, {name}_w)",
            f"{name}_bias = Add ({name}_mm, {name}_b)",
            f"{name}_act = Tanh ({name}_bias)",
            f"{name}_out = Add ({name}_act, {previous})",
        ]
        initializers[f"{name}_w"] = _weights(rng, width, width, scale=0.3 / np.sqrt(width))
        initializers[f"{name}_b"] = _weights(rng, width, scale=0.01)
        previous = f"{name}_out"
    lines.append(f"output = Identity ({previous})")
    text = (
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        f"deep (float[N,{width}] input) => (float[N,{width}] output) {{\n"
        + "\n".join(lines)
        + "\n}"
    )
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(
        onnx.numpy_helper.from_array(array, name) for name, array in initializers.items()
    )
    onnx.checker.check_model(model)
    return model


def save(model: onnx.ModelProto, path: str | Path) -> Path:
    """Writes `model` to `path` and returns the path."""
    path = Path(path)
    onnx.save_model(model, str(path))
    return path


def save_with_external_data(model: onnx.ModelProto, path: str | Path) -> Path:
    """Writes `model` to `path` with every tensor in `<name>.data` beside it."""
    path = Path(path)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
        size_threshold=0,
    )
    return path


def random_inputs(
    model: onnx.ModelProto, *, batch: int = 1, seed: int = 0
) -> dict[str, np.ndarray]:
    """Standard-normal float32 feeds for every input; dynamic dims become `batch`."""
    rng = np.random.default_rng(seed)
    feeds = {}
    initializers = {tensor.name for tensor in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = [
            d.dim_value if d.HasField("dim_value") else batch
            for d in value.type.tensor_type.shape.dim
        ]
        feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def write_samples(folder: str | Path, samples: list[dict[str, np.ndarray]]) -> Path:
    """Writes samples as `s00000.npy` (one input) or `.npz` files; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index, feeds in enumerate(samples):
        if len(feeds) == 1:
            np.save(folder / f"s{index:05d}.npy", next(iter(feeds.values())))
        else:
            np.savez(folder / f"s{index:05d}.npz", **feeds)
    return folder


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
