"""Transformer pieces: embeddings (tied or not), LayerNormalization, Softmax."""

from __future__ import annotations

import numpy as np
import onnx

from qconvert.testing._build import checked_model, random_weights


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
    return checked_model(
        text,
        {
            "table": random_weights(rng, vocab, d),
            "w1": random_weights(rng, d, hidden, scale=0.2),
            "b1": random_weights(rng, hidden, scale=0.1),
            "w2": random_weights(rng, hidden, d, scale=0.2),
            "w3": random_weights(rng, classes, d, scale=0.2),
            "b3": random_weights(rng, classes, scale=0.1),
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
    table = random_weights(rng, vocab, d)
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
    return checked_model(
        text,
        {
            "table": table,
            "w1": random_weights(rng, d, hidden, scale=0.2),
            "w2": random_weights(rng, hidden, d, scale=0.2),
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
    return checked_model(
        text,
        {
            "w": random_weights(rng, k, k, scale=0.3),
            "gamma": (1 + 0.1 * rng.standard_normal(k)).astype(np.float32),
            "beta": random_weights(rng, k, scale=0.1),
        },
    )


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
    return checked_model(text, {name: np.asarray(a, np.float32) for name, a in arrays.items()})
