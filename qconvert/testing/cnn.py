"""Convolutional graphs: Conv stacks, BatchNormalization, depthwise blocks."""

from __future__ import annotations

import numpy as np
import onnx

from qconvert.testing._build import checked_model, random_weights


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
    return checked_model(
        text,
        {
            "conv_w": random_weights(rng, c, 3, 3, 3),
            "conv_b": random_weights(rng, c, scale=0.1),
            "bn_scale": (1 + 0.2 * rng.standard_normal(c)).astype(np.float32),
            "bn_bias": random_weights(rng, c, scale=0.1),
            "bn_mean": random_weights(rng, c, scale=0.1),
            "bn_var": (0.5 + rng.random(c)).astype(np.float32),
            "fc_w": random_weights(rng, 10, c * 16, scale=0.1),
            "fc_b": random_weights(rng, 10, scale=0.1),
        },
    )


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
    model = checked_model(
        text, {k: np.asarray(v, np.float32) for k, v in initializers.items()}
    )
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
    w1 = random_weights(rng, channels, 4, 1, 1) * gains.reshape(-1, 1, 1, 1).astype(np.float32)
    w2 = random_weights(rng, channels, 1, 3, 3) / gains.reshape(-1, 1, 1, 1).astype(np.float32)
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
    return checked_model(
        text,
        {
            "w1": w1,
            "b1": (0.1 * gains).astype(np.float32),
            "a1": np.float32(2.0),
            "c1": np.float32(0.5),
            "a2": np.float32(0.7),
            "c2": np.float32(-0.2),
            "w2": w2.astype(np.float32),
            "w3": random_weights(rng, 4, channels, 1, 1),
        },
    )


def pointwise_two_depthwise(
    spread: float = 50.0, channels: int = 8, *, activation: str = "", seed: int = 0
) -> onnx.ModelProto:
    """Conv 1x1 -> two depthwise Convs (3x3 and 5x5) -> Add -> Conv 1x1 (MixConv-style).

    The pointwise Conv's output channels differ in range by `spread` and the depthwise
    Convs gain back what each channel lost. Its output has two readers, so no Conv -> Conv
    pair exists for weight equalization. `activation` (an op type such as "Relu"): the
    depthwise Convs read the pointwise Conv through it (tensor `a`) instead of directly.
    Input [N, 4, 16, 16]; output [N, 4, 16, 16].
    """
    rng = np.random.default_rng(seed)
    gains = (spread ** (-np.arange(channels) / (channels - 1))).reshape(-1, 1, 1, 1)
    read = "a" if activation else "h"
    applied = f"a = {activation} (h)" if activation else ""
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        pw_two_dw (float[N,4,16,16] input) => (float[N,4,16,16] output) {{
            h = Conv <kernel_shape = [1,1]> (input, w1, b1)
            {applied}
            d = Conv <pads = [1,1,1,1], kernel_shape = [3,3], group = {channels}> ({read}, w2)
            e = Conv <pads = [2,2,2,2], kernel_shape = [5,5], group = {channels}> ({read}, w4)
            f = Add (d, e)
            output = Conv <kernel_shape = [1,1]> (f, w3)
        }}
    """
    return checked_model(
        text,
        {
            "w1": random_weights(rng, channels, 4, 1, 1) * gains.astype(np.float32),
            "b1": (0.5 * gains.ravel()).astype(np.float32),
            "w2": (random_weights(rng, channels, 1, 3, 3) / gains).astype(np.float32),
            "w3": random_weights(rng, 4, channels, 1, 1),
            "w4": (random_weights(rng, channels, 1, 5, 5) / gains).astype(np.float32),
        },
    )


def upsample_add(
    factor: int = 2,
    channels: int = 8,
    *,
    coordinate_mode: str = "asymmetric",
    nearest_mode: str = "floor",
    seed: int = 0,
) -> onnx.ModelProto:
    """One top-down step of a feature pyramid: nearest upsampling, then a lateral Add.

    Conv 3x3 -> Relu (the lateral map, [N, C, H, W]) -> Conv 3x3 with stride `factor` ->
    Relu -> Resize nearest x`factor` -> Add (lateral) -> Conv 1x1. H and W are dynamic
    (multiples of `factor`), as in a text detector's head. Input [N, 3, H, W]; output
    [N, 4, H, W].
    """
    rng = np.random.default_rng(seed)
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        upsample_add (float[N,3,H,W] input) => (float[N,4,H,W] output) {{
            c1 = Conv <pads = [1,1,1,1], kernel_shape = [3,3]> (input, w1, b1)
            lateral = Relu (c1)
            c2 = Conv <pads = [1,1,1,1], kernel_shape = [3,3], strides = [{factor},{factor}]>
                (lateral, w2, b2)
            top = Relu (c2)
            up = Resize <mode = "nearest", nearest_mode = "{nearest_mode}",
                coordinate_transformation_mode = "{coordinate_mode}"> (top, roi, scales)
            merged = Add (up, lateral)
            output = Conv <kernel_shape = [1,1]> (merged, w3, b3)
        }}
    """
    return checked_model(
        text,
        {
            "w1": random_weights(rng, channels, 3, 3, 3),
            "b1": random_weights(rng, channels, scale=0.1),
            "w2": random_weights(rng, channels, channels, 3, 3, scale=0.2),
            "b2": random_weights(rng, channels, scale=0.1),
            "roi": np.zeros(0, np.float32),
            "scales": np.array([1, 1, factor, factor], np.float32),
            "w3": random_weights(rng, 4, channels, 1, 1),
            "b3": random_weights(rng, 4, scale=0.1),
        },
    )


def squeeze_excitation(
    channels: int = 32,
    *,
    activation: str = "HardSwish",
    gate: str = "HardSigmoid",
    squeeze: int = 4,
    seed: int = 0,
) -> onnx.ModelProto:
    """Conv 1x1 -> activation -> squeeze-excitation gate -> Mul -> Conv 1x1.

    The gate: GlobalAveragePool -> Conv 1x1 (channels / squeeze) -> Relu -> Conv 1x1 ->
    `gate` (HardSigmoid or Sigmoid), multiplied into the activation's output, which the
    last Conv reads.
    `activation` is HardSwish (a float op: the gate reads a vector that exists in float)
    or Relu (folded into the first Conv, which runs quantized). The gate's Convs are named
    `squeeze` and `excite`, the Mul `scale`. Input [N, 16, 12, 24]; output [N, 16, 12, 24].
    """
    rng = np.random.default_rng(seed)
    c, r = channels, channels // squeeze
    gate_op = "HardSigmoid <alpha = 0.1666667, beta = 0.5>" if gate == "HardSigmoid" else gate
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        squeeze_excitation (float[N,16,12,24] input) => (float[N,16,12,24] output) {{
            h = Conv <kernel_shape = [1,1]> (input, w1, b1)
            x = {activation} (h)
            p = GlobalAveragePool (x)
            s = Conv <kernel_shape = [1,1]> (p, ws, bs)
            t = Relu (s)
            e = Conv <kernel_shape = [1,1]> (t, we, be)
            gate = {gate_op} (e)
            y = Mul (x, gate)
            output = Conv <kernel_shape = [1,1]> (y, w2, b2)
        }}
    """
    model = checked_model(
        text,
        {
            "w1": random_weights(rng, c, 16, 1, 1, scale=0.5),
            "b1": random_weights(rng, c, scale=0.5),
            "ws": random_weights(rng, r, c, 1, 1, scale=0.5),
            "bs": random_weights(rng, r, scale=0.1),
            "we": random_weights(rng, c, r, 1, 1, scale=0.5),
            "be": random_weights(rng, c, scale=0.1),
            "w2": random_weights(rng, 16, c, 1, 1, scale=0.3),
            "b2": random_weights(rng, 16, scale=0.1),
        },
    )
    names = {"s": "squeeze", "e": "excite", "y": "scale"}
    for node in model.graph.node:
        if node.output[0] in names:
            node.name = names[node.output[0]]
    return model


def thin_chain(*, gate: bool = True, seed: int = 0) -> onnx.ModelProto:
    """HardSwish -> Conv 1x1 (8 to 8) -> Relu -> depthwise 3x3 -> Relu -> [gate] -> wide Convs.

    A small inverted-residual block after a stem: thin Convs (at most 8 input channels per
    output) on a float tensor. With `gate`, a squeeze-excitation gate (GlobalAveragePool,
    Conv 8 -> 2, Relu, Conv 2 -> 8, HardSigmoid) scales the depthwise output (Mul `scale`);
    then Conv 1x1 8 -> 16 and Relu and Conv 1x1 16 -> 16, the first with more than 8 input
    channels. The thin Convs are named `pointwise` and `depthwise`. Input [N, 8, 24, 48].
    """
    rng = np.random.default_rng(seed)
    scaled = "y" if gate else "d"
    gate_text = (
        """
            p = GlobalAveragePool (d)
            s = Conv <kernel_shape = [1,1]> (p, ws, bs)
            t = Relu (s)
            e = Conv <kernel_shape = [1,1]> (t, we, be)
            g = HardSigmoid <alpha = 0.1666667, beta = 0.5> (e)
            y = Mul (d, g)"""
        if gate
        else ""
    )
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        thin_chain (float[N,8,24,48] input) => (float[N,16,24,48] output) {{
            x = HardSwish (input)
            h = Conv <kernel_shape = [1,1]> (x, w1, b1)
            a = Relu (h)
            c = Conv <pads = [1,1,1,1], kernel_shape = [3,3], group = 8> (a, wd, bd)
            d = Relu (c){gate_text}
            k = Conv <kernel_shape = [1,1]> ({scaled}, w2, b2)
            r = Relu (k)
            output = Conv <kernel_shape = [1,1]> (r, w3, b3)
        }}
    """
    # Drawn in graph order, so the same seed gives the same weights with or without a gate.
    weights = {
        "w1": random_weights(rng, 8, 8, 1, 1),
        "b1": random_weights(rng, 8, scale=0.2),
        "wd": random_weights(rng, 8, 1, 3, 3),
        "bd": random_weights(rng, 8, scale=0.2),
    }
    if gate:
        weights |= {
            "ws": random_weights(rng, 2, 8, 1, 1),
            "bs": random_weights(rng, 2, scale=0.1),
            "we": random_weights(rng, 8, 2, 1, 1),
            "be": random_weights(rng, 8, scale=0.1),
        }
    weights |= {
        "w2": random_weights(rng, 16, 8, 1, 1),
        "b2": random_weights(rng, 16, scale=0.2),
        "w3": random_weights(rng, 16, 16, 1, 1, scale=0.3),
        "b3": random_weights(rng, 16, scale=0.1),
    }
    model = checked_model(text, weights)
    names = {"h": "pointwise", "c": "depthwise", "y": "scale", "k": "widen"}
    for node in model.graph.node:
        if node.output[0] in names:
            node.name = names[node.output[0]]
    return model
