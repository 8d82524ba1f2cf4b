"""MatMul and Gemm graphs: small MLPs, two-input sums, a long residual chain."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper

from qconvert.testing._build import checked_model, random_weights


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
    return checked_model(
        text, {"w": random_weights(rng, k, n), "b": random_weights(rng, n, scale=0.1)}
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
    return checked_model(
        text, {"wa": random_weights(rng, k, k), "wb": random_weights(rng, k, k)}
    )


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
    return checked_model(
        text,
        {
            "w1": random_weights(rng, k, hidden),
            "w2": random_weights(rng, hidden, k, scale=0.2),
        },
    )


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
    w1 = random_weights(rng, 16, 16)
    w1[:, 0] *= 1e-4
    w2 = random_weights(rng, 16, 16)
    w2[0] *= 1000.0
    model = checked_model(
        text,
        {
            "w1": w1,
            "b1": np.zeros(16, np.float32),
            "w2": w2,
            "b2": random_weights(rng, 16, scale=0.1),
            "w3": random_weights(rng, 16, 10),
            "b3": random_weights(rng, 10, scale=0.1),
        },
    )
    for node, name in zip(model.graph.node, ("g1", "r1", "g2", "r2", "g3"), strict=True):
        node.name = name
    return model


def gemm_bias(w: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    """Gemm <transB = 1> (input, w, b): input [N, K] -> [N, O], w [O, K]."""
    out, k = w.shape
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        gemm_bias (float[N,{k}] input) => (float[N,{out}] output) {{
            output = Gemm <transB = 1> (input, w, b)
        }}
    """
    model = checked_model(text, {"w": w.astype(np.float32), "b": b.astype(np.float32)})
    model.graph.node[0].name = "gemm"
    return model


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
        initializers[f"{name}_w"] = random_weights(
            rng, width, width, scale=0.3 / np.sqrt(width)
        )
        initializers[f"{name}_b"] = random_weights(rng, width, scale=0.01)
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
