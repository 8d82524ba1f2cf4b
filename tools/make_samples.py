"""Build the sample models and data sets that qconvert is tested and demonstrated on.

What: trains three small classifiers on scikit-learn's bundled ``digits`` data set
(1797 8x8 grey-scale images, 10 classes) and writes, for each one, into
``<out>/<name>/``:

* ``model.onnx``  -- the float model, opset 17 / IR 8, input ``input`` with a
  symbolic batch dim ``N``, output ``logits`` of shape ``[N, 10]``;
* ``calib/``      -- 256 calibration samples ``s00000.npy`` ... ``s00255.npy``;
* ``eval/``       -- 500 held-out samples ``s00000.npy`` ... ``s00499.npy`` and
  ``labels.npy`` (int64, one label per sample in sorted file-name order).

Each sample file holds one float32 sample without the batch dim.  A
``README.md`` describing the models and their float accuracy is written too.

Why: qconvert needs small, realistic, fully reproducible float models that cover
the patterns a post-training quantizer must handle (Conv + separate
BatchNormalization, depthwise convolutions, ReLU6 as Clip, Gemm, and a
transformer built from MatMul / LayerNormalization / Softmax / Erf), together
with calibration and evaluation data, without downloading anything.  The ONNX
graphs are written node by node with ``onnx.helper`` from the trained weights
(not with ``torch.onnx.export``) so that the graph structure is exactly known
and stable across torch versions.  Every torch ``forward`` computes the same
math as its hand-written graph; the script checks that onnxruntime reproduces
the torch logits on the eval set before it finishes.

Preprocessing: pixel values are divided by 16 (to [0, 1]) and each 8x8 image is
upsampled to 16x16 with bilinear interpolation
(``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``).

Split: a fixed permutation from ``np.random.default_rng(0)``; the first 500
images are the eval set (never trained on), the remaining 1297 are the training
set, and the calibration set is 256 images drawn (with the same generator)
from the training set.

Usage::

    python tools/make_samples.py [--out sample_models]

Needs torch and scikit-learn (the dev-only ``samples`` extra); qconvert itself
never imports them.
"""

from __future__ import annotations

import argparse
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from torch import nn

OPSET = 17
IR_VERSION = 8
SEED = 0
N_EVAL = 500
N_CALIB = 256
IMG = 16
N_CLASSES = 10
BN_EPS = 1e-5
LN_EPS = 1e-5


# --------------------------------------------------------------------------- data


def load_images() -> tuple[np.ndarray, np.ndarray]:
    """Return digits images as float32 ``[1797, 16, 16]`` in [0, 1] and int64 labels.

    Images are scaled by 1/16 and upsampled from 8x8 to 16x16 with bilinear
    interpolation (``align_corners=False``).
    """
    digits = load_digits()
    x8 = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    x16 = F.interpolate(x8, size=(IMG, IMG), mode="bilinear", align_corners=False)
    return x16.squeeze(1).numpy().astype(np.float32), digits.target.astype(np.int64)


def make_split(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return fixed ``(train, calib, eval)`` index arrays.

    eval: the first ``N_EVAL`` indices of a seeded permutation; train: the rest;
    calib: ``N_CALIB`` indices drawn without replacement from train.
    """
    rng = np.random.default_rng(SEED)
    perm = rng.permutation(n)
    eval_idx, train_idx = perm[:N_EVAL], perm[N_EVAL:]
    calib_idx = rng.choice(train_idx, size=N_CALIB, replace=False)
    return train_idx, calib_idx, eval_idx


def write_samples(
    model_dir: Path, calib: np.ndarray, evals: np.ndarray, labels: np.ndarray
) -> None:
    """Write ``calib/`` and ``eval/`` (one ``sNNNNN.npy`` per sample, plus eval labels)."""
    for sub, data in (("calib", calib), ("eval", evals)):
        folder = model_dir / sub
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for i, sample in enumerate(data):
            np.save(
                folder / f"s{i:05d}.npy",
                np.ascontiguousarray(sample, dtype=np.float32),
                allow_pickle=False,
            )
    np.save(model_dir / "eval" / "labels.npy", labels.astype(np.int64), allow_pickle=False)


# --------------------------------------------------------------------------- graph builder


@dataclass
class GraphBuilder:
    """Accumulates ONNX nodes and initializers with unique, readable names."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: dict[str, onnx.TensorProto] = field(default_factory=dict)

    def init(
        self, name: str, value: np.ndarray | torch.Tensor | None, dtype: Any = np.float32
    ) -> str:
        """Add an initializer (torch tensors are detached and copied) and return its name."""
        if value is None:
            raise ValueError(f"initializer {name} has no value")
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        if name in self.inits:
            raise ValueError(f"duplicate initializer {name}")
        self.inits[name] = numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        """Add a single-output node named ``name`` whose output tensor is also ``name``."""
        if any(n.name == name for n in self.nodes):
            raise ValueError(f"duplicate node {name}")
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def model(
        self, graph_name: str, in_shape: list[int | str], out_name: str, doc: str
    ) -> onnx.ModelProto:
        """Rename the last output to ``logits``; wrap the graph in a checked opset-17 model."""
        last = self.nodes[-1]
        assert last.output[0] == out_name
        last.output[0] = "logits"
        graph = helper.make_graph(
            self.nodes,
            graph_name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", N_CLASSES])],
            initializer=list(self.inits.values()),
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="qconvert-make_samples",
            doc_string=doc,
        )
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model, full_check=True)
        return model


def conv_bn(
    g: GraphBuilder, x: str, conv: nn.Module, bn: nn.Module, names: tuple[str, str, str]
) -> str:
    """Emit Conv -> BatchNormalization -> Relu/Clip(0,6) and return the output.

    ``names`` are the (conv, bn, activation) node names; the activation is ReLU6
    (``Clip`` with the shared ``relu6_min``/``relu6_max`` inputs) when its name
    contains ``relu6``, else ``Relu``.
    """
    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
    prefix, bn_name, act_name = names
    inputs = [x, g.init(f"{prefix}.weight", conv.weight)]
    if conv.bias is not None:
        inputs.append(g.init(f"{prefix}.bias", conv.bias))
    kh, kw = conv.kernel_size
    ph, pw = cast("tuple[int, int]", conv.padding)
    y = g.node(
        "Conv",
        inputs,
        prefix,
        kernel_shape=[kh, kw],
        pads=[ph, pw, ph, pw],
        strides=list(conv.stride),
        group=conv.groups,
    )
    y = g.node(
        "BatchNormalization",
        [
            y,
            g.init(f"{bn_name}.scale", bn.weight),
            g.init(f"{bn_name}.bias", bn.bias),
            g.init(f"{bn_name}.running_mean", bn.running_mean),
            g.init(f"{bn_name}.running_var", bn.running_var),
        ],
        bn_name,
        epsilon=bn.eps,
    )
    if "relu6" in act_name:
        return g.node("Clip", [y, "relu6_min", "relu6_max"], act_name)
    return g.node("Relu", [y], act_name)


def gemm(g: GraphBuilder, x: str, lin: nn.Linear, name: str) -> str:
    """Emit ``Gemm(x, W, b, transB=1)`` for a torch Linear layer."""
    return g.node(
        "Gemm",
        [x, g.init(f"{name}.weight", lin.weight), g.init(f"{name}.bias", lin.bias)],
        name,
        transB=1,
    )


# --------------------------------------------------------------------------- models


class SampleNet(nn.Module):
    """A torch model that can write itself as a hand-built ONNX graph."""

    def to_onnx(self) -> onnx.ModelProto:
        """Return the trained network as a checked ONNX model."""
        raise NotImplementedError


class DigitsCNN(SampleNet):
    """Plain CNN: 2x (Conv3x3 + BN + ReLU + MaxPool2) -> Flatten -> FC 1024-128-10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32, eps=BN_EPS)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64, eps=BN_EPS)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[N,1,16,16]`` images to ``[N,10]`` logits."""
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)

    def to_onnx(self) -> onnx.ModelProto:
        """Write the trained network as an ONNX graph, BatchNormalization kept separate."""
        g = GraphBuilder()
        x = conv_bn(g, "input", self.conv1, self.bn1, ("conv1", "bn1", "relu1"))
        x = g.node("MaxPool", [x], "pool1", kernel_shape=[2, 2], strides=[2, 2])
        x = conv_bn(g, x, self.conv2, self.bn2, ("conv2", "bn2", "relu2"))
        x = g.node("MaxPool", [x], "pool2", kernel_shape=[2, 2], strides=[2, 2])
        x = g.node("Flatten", [x], "flatten", axis=1)
        x = g.node("Relu", [gemm(g, x, self.fc1, "fc1")], "relu3")
        x = gemm(g, x, self.fc2, "fc2")
        return g.model(
            "digits_cnn", ["N", 1, IMG, IMG], x, "Plain CNN on 16x16 digits (qconvert sample)."
        )


#: depthwise-separable blocks: (in_channels, out_channels, depthwise stride)
DWSEP_BLOCKS: list[tuple[int, int, int]] = [
    (32, 64, 1),
    (64, 128, 2),
    (128, 256, 1),
    (256, 256, 2),
]


class DigitsDWSep(SampleNet):
    """MobileNet-style CNN: stem + 4 depthwise-separable blocks (BN, ReLU6) + GAP + FC."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 32, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(32, eps=BN_EPS)
        self.dw = nn.ModuleList()
        self.dw_bn = nn.ModuleList()
        self.pw = nn.ModuleList()
        self.pw_bn = nn.ModuleList()
        for cin, cout, stride in DWSEP_BLOCKS:
            self.dw.append(
                nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False)
            )
            self.dw_bn.append(nn.BatchNorm2d(cin, eps=BN_EPS))
            self.pw.append(nn.Conv2d(cin, cout, 1, bias=False))
            self.pw_bn.append(nn.BatchNorm2d(cout, eps=BN_EPS))
        self.fc = nn.Linear(DWSEP_BLOCKS[-1][1], N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[N,1,16,16]`` images to ``[N,10]`` logits."""
        x = F.relu6(self.stem_bn(self.stem(x)))
        for dw, dw_bn, pw, pw_bn in zip(self.dw, self.dw_bn, self.pw, self.pw_bn, strict=True):
            x = F.relu6(dw_bn(dw(x)))
            x = F.relu6(pw_bn(pw(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)

    def to_onnx(self) -> onnx.ModelProto:
        """Write the trained network as an ONNX graph (ReLU6 as Clip with min/max inputs)."""
        g = GraphBuilder()
        g.init("relu6_min", np.array(0.0))
        g.init("relu6_max", np.array(6.0))
        x = conv_bn(
            g, "input", self.stem, self.stem_bn, ("stem_conv", "stem_bn", "stem_relu6")
        )
        blocks = zip(self.dw, self.dw_bn, self.pw, self.pw_bn, strict=True)
        for i, (dw, dw_bn, pw, pw_bn) in enumerate(blocks, start=1):
            b = f"block{i}"
            x = conv_bn(g, x, dw, dw_bn, (f"{b}_dw_conv", f"{b}_dw_bn", f"{b}_dw_relu6"))
            x = conv_bn(g, x, pw, pw_bn, (f"{b}_pw_conv", f"{b}_pw_bn", f"{b}_pw_relu6"))
        x = g.node("GlobalAveragePool", [x], "gap")
        x = g.node("Flatten", [x], "flatten", axis=1)
        x = gemm(g, x, self.fc, "fc")
        return g.model(
            "digits_dwsep",
            ["N", 1, IMG, IMG],
            x,
            "MobileNet-style depthwise-separable CNN on 16x16 digits.",
        )


D_MODEL = 128
N_HEADS = 4
D_HEAD = D_MODEL // N_HEADS
D_FF = 256
N_LAYERS = 2
N_TOKENS = IMG


def _param(*shape: int, std: float = 0.02) -> nn.Parameter:
    """Make a trainable tensor drawn from N(0, std) (zeros when std is 0)."""
    return nn.Parameter(torch.randn(*shape) * std if std else torch.zeros(*shape))


class EncoderLayer(nn.Module):
    """Pre-LN encoder layer; ``[in, out]`` weight matrices laid out as in the ONNX graph."""

    def __init__(self) -> None:
        super().__init__()
        s_in, s_ff = 1 / math.sqrt(D_MODEL), 1 / math.sqrt(D_FF)
        self.ln1_scale, self.ln1_bias = (
            nn.Parameter(torch.ones(D_MODEL)),
            _param(D_MODEL, std=0),
        )
        self.wq, self.bq = _param(D_MODEL, D_MODEL, std=s_in), _param(D_MODEL, std=0)
        self.wk, self.bk = _param(D_MODEL, D_MODEL, std=s_in), _param(D_MODEL, std=0)
        self.wv, self.bv = _param(D_MODEL, D_MODEL, std=s_in), _param(D_MODEL, std=0)
        self.wo, self.bo = _param(D_MODEL, D_MODEL, std=s_in), _param(D_MODEL, std=0)
        self.ln2_scale, self.ln2_bias = (
            nn.Parameter(torch.ones(D_MODEL)),
            _param(D_MODEL, std=0),
        )
        self.w1, self.b1 = _param(D_MODEL, D_FF, std=s_in), _param(D_FF, std=0)
        self.w2, self.b2 = _param(D_FF, D_MODEL, std=s_ff), _param(D_MODEL, std=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[N,T,D]`` to ``[N,T,D]``: x + MHSA(LN(x)), then + FFN(LN(.))."""
        n = x.shape[0]
        h = F.layer_norm(x, (D_MODEL,), self.ln1_scale, self.ln1_bias, LN_EPS)
        q = (h @ self.wq + self.bq).reshape(n, N_TOKENS, N_HEADS, D_HEAD).permute(0, 2, 1, 3)
        kt = (h @ self.wk + self.bk).reshape(n, N_TOKENS, N_HEADS, D_HEAD).permute(0, 2, 3, 1)
        v = (h @ self.wv + self.bv).reshape(n, N_TOKENS, N_HEADS, D_HEAD).permute(0, 2, 1, 3)
        att = torch.softmax((q @ kt) * (1.0 / math.sqrt(D_HEAD)), dim=-1)
        ctx = (att @ v).permute(0, 2, 1, 3).reshape(n, N_TOKENS, D_MODEL)
        x = x + (ctx @ self.wo + self.bo)
        h = F.layer_norm(x, (D_MODEL,), self.ln2_scale, self.ln2_bias, LN_EPS)
        h = h @ self.w1 + self.b1
        h = h * (1.0 + torch.erf(h / math.sqrt(2.0))) * 0.5
        return x + (h @ self.w2 + self.b2)

    def to_onnx(self, g: GraphBuilder, x: str, p: str) -> str:
        """Emit this layer's nodes (names prefixed with ``p``) and return its output name."""

        def linear(inp: str, w: torch.Tensor, b: torch.Tensor, name: str) -> str:
            y = g.node("MatMul", [inp, g.init(f"{name}.weight", w)], f"{name}_matmul")
            return g.node("Add", [y, g.init(f"{name}.bias", b)], f"{name}_add")

        def layernorm(inp: str, scale: torch.Tensor, bias: torch.Tensor, name: str) -> str:
            s, b = g.init(f"{name}.scale", scale), g.init(f"{name}.bias", bias)
            return g.node("LayerNormalization", [inp, s, b], name, axis=-1, epsilon=LN_EPS)

        h = layernorm(x, self.ln1_scale, self.ln1_bias, f"{p}_ln1")
        q = g.node(
            "Reshape", [linear(h, self.wq, self.bq, f"{p}_q"), "heads_shape"], f"{p}_q_reshape"
        )
        q = g.node("Transpose", [q], f"{p}_q_transpose", perm=[0, 2, 1, 3])
        k = g.node(
            "Reshape", [linear(h, self.wk, self.bk, f"{p}_k"), "heads_shape"], f"{p}_k_reshape"
        )
        kt = g.node("Transpose", [k], f"{p}_k_transpose", perm=[0, 2, 3, 1])
        v = g.node(
            "Reshape", [linear(h, self.wv, self.bv, f"{p}_v"), "heads_shape"], f"{p}_v_reshape"
        )
        v = g.node("Transpose", [v], f"{p}_v_transpose", perm=[0, 2, 1, 3])
        s = g.node("MatMul", [q, kt], f"{p}_qk_matmul")
        s = g.node("Mul", [s, "attn_scale"], f"{p}_qk_scale")
        a = g.node("Softmax", [s], f"{p}_softmax", axis=-1)
        c = g.node("MatMul", [a, v], f"{p}_av_matmul")
        c = g.node("Transpose", [c], f"{p}_ctx_transpose", perm=[0, 2, 1, 3])
        c = g.node("Reshape", [c, "tokens_shape"], f"{p}_ctx_reshape")
        x = g.node("Add", [x, linear(c, self.wo, self.bo, f"{p}_out")], f"{p}_residual1")
        h = layernorm(x, self.ln2_scale, self.ln2_bias, f"{p}_ln2")
        h = linear(h, self.w1, self.b1, f"{p}_ff1")
        e = g.node("Div", [h, "gelu_sqrt2"], f"{p}_gelu_div")
        e = g.node("Erf", [e], f"{p}_gelu_erf")
        e = g.node("Add", [e, "gelu_one"], f"{p}_gelu_add")
        e = g.node("Mul", [h, e], f"{p}_gelu_mul")
        h = g.node("Mul", [e, "gelu_half"], f"{p}_gelu_half")
        h = linear(h, self.w2, self.b2, f"{p}_ff2")
        return g.node("Add", [x, h], f"{p}_residual2")


class DigitsTransformer(SampleNet):
    """Pre-LN transformer encoder over the 16 image rows as tokens, mean-pooled to logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_w, self.embed_b = (
            _param(IMG, D_MODEL, std=1 / math.sqrt(IMG)),
            _param(D_MODEL, std=0),
        )
        self.pos = _param(N_TOKENS, D_MODEL, std=0.02)
        self.layers = nn.ModuleList(EncoderLayer() for _ in range(N_LAYERS))
        self.ln_f_scale, self.ln_f_bias = (
            nn.Parameter(torch.ones(D_MODEL)),
            _param(D_MODEL, std=0),
        )
        self.head = nn.Linear(D_MODEL, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[N,16,16]`` images (rows as tokens) to ``[N,10]`` logits."""
        x = (x @ self.embed_w + self.embed_b) + self.pos
        for layer in self.layers:
            x = layer(x)
        x = F.layer_norm(x, (D_MODEL,), self.ln_f_scale, self.ln_f_bias, LN_EPS)
        return self.head(x.mean(dim=1))

    def to_onnx(self) -> onnx.ModelProto:
        """Write the trained network as MatMul/Add/LayerNormalization/Softmax/Erf nodes."""
        g = GraphBuilder()
        g.init("heads_shape", np.array([0, N_TOKENS, N_HEADS, D_HEAD]), np.int64)
        g.init("tokens_shape", np.array([0, N_TOKENS, D_MODEL]), np.int64)
        g.init("attn_scale", np.array(1.0 / math.sqrt(D_HEAD)))
        g.init("gelu_sqrt2", np.array(math.sqrt(2.0)))
        g.init("gelu_one", np.array(1.0))
        g.init("gelu_half", np.array(0.5))
        x = g.node("MatMul", ["input", g.init("embed.weight", self.embed_w)], "embed_matmul")
        x = g.node("Add", [x, g.init("embed.bias", self.embed_b)], "embed_add")
        x = g.node("Add", [x, g.init("pos_embed", self.pos)], "pos_add")
        for i, layer in enumerate(self.layers):
            x = cast(EncoderLayer, layer).to_onnx(g, x, f"layer{i}")
        s, b = g.init("ln_f.scale", self.ln_f_scale), g.init("ln_f.bias", self.ln_f_bias)
        x = g.node("LayerNormalization", [x, s, b], "ln_f", axis=-1, epsilon=LN_EPS)
        x = g.node("ReduceMean", [x], "token_mean", axes=[1], keepdims=0)
        x = gemm(g, x, self.head, "head")
        return g.model(
            "digits_transformer",
            ["N", N_TOKENS, IMG],
            x,
            "2-layer pre-LN transformer encoder over digit rows.",
        )


# --------------------------------------------------------------------------- train / evaluate


@dataclass(frozen=True)
class Spec:
    """How to build, train and describe one sample model."""

    name: str
    make: Callable[[], SampleNet]
    arch: str
    sample_shape: tuple[int, ...]
    epochs: int
    lr: float
    batch: int = 32


SPECS: list[Spec] = [
    Spec(
        "digits_cnn",
        DigitsCNN,
        "Conv(1→32,3x3)+BN+ReLU → MaxPool → Conv(32→64,3x3)+BN+ReLU → MaxPool → Flatten → "
        "Gemm(1024→128)+ReLU → Gemm(128→10)",
        (1, IMG, IMG),
        epochs=30,
        lr=1e-3,
    ),
    Spec(
        "digits_dwsep",
        DigitsDWSep,
        "Conv(1→32,3x3)+BN+ReLU6 → 4x [DWConv 3x3 (stride 1,2,1,2)+BN+ReLU6 → "
        "PWConv 1x1+BN+ReLU6] "
        "(32→64→128→256→256 ch) → GlobalAveragePool → Flatten → Gemm(256→10)",
        (1, IMG, IMG),
        epochs=40,
        lr=2e-3,
    ),
    Spec(
        "digits_transformer",
        DigitsTransformer,
        "rows as 16 tokens → MatMul embed(16→128)+bias+pos → 2x pre-LN encoder layer "
        "[LN → 4-head self-attention (MatMul/Softmax) → residual; "
        "LN → FFN 128→256 GELU(Erf) → 128 → residual] "
        "→ LN → ReduceMean(tokens) → Gemm(128→10)",
        (IMG, IMG),
        epochs=80,
        lr=1e-3,
    ),
]


def train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch: int
) -> None:
    """Train with Adam + cross-entropy on seeded shuffles; leave the model in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
    model.eval()


def count_params(model: nn.Module) -> int:
    """Count trainable parameters (BatchNorm running statistics excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_folder(folder: Path, count: int) -> np.ndarray:
    """Stack ``s00000.npy`` ... from ``folder`` back into one batch."""
    return np.stack(
        [np.load(folder / f"s{i:05d}.npy", allow_pickle=False) for i in range(count)]
    )


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """Run the ONNX model at ``path`` on batch ``x`` with single-threaded onnxruntime (CPU)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


@dataclass(frozen=True)
class Result:
    """Summary numbers for one written sample model."""

    name: str
    arch: str
    params: int
    size_bytes: int
    acc_torch: float
    acc_ort: float
    max_abs_diff: float
    input_shape: str
    op_counts: dict[str, int]


def build_one(
    spec: Spec,
    out: Path,
    images: np.ndarray,
    labels: np.ndarray,
    split: tuple[np.ndarray, ...],
) -> Result:
    """Train, export, write data for and verify one model."""
    train_idx, calib_idx, eval_idx = split
    shaped = images.reshape((len(images), *spec.sample_shape))
    torch.manual_seed(SEED)
    model = spec.make()
    x_train, y_train = torch.from_numpy(shaped[train_idx]), torch.from_numpy(labels[train_idx])
    train(model, x_train, y_train, spec.epochs, spec.lr, spec.batch)

    model_dir = out / spec.name
    model_dir.mkdir(parents=True, exist_ok=True)
    onnx_model = model.to_onnx()
    onnx.save(onnx_model, str(model_dir / "model.onnx"))
    write_samples(model_dir, shaped[calib_idx], shaped[eval_idx], labels[eval_idx])

    x_eval = load_folder(model_dir / "eval", N_EVAL)
    y_eval = np.load(model_dir / "eval" / "labels.npy")
    with torch.no_grad():
        t_logits = model(torch.from_numpy(x_eval)).numpy()
    o_logits = ort_logits(model_dir / "model.onnx", x_eval)
    diff = float(np.abs(t_logits - o_logits).max())
    acc_t = float((t_logits.argmax(1) == y_eval).mean())
    acc_o = float((o_logits.argmax(1) == y_eval).mean())
    if diff > 1e-4 or acc_t != acc_o:
        raise RuntimeError(
            f"{spec.name}: onnxruntime disagrees with torch (max |diff| {diff:.2e})"
        )
    ops: dict[str, int] = {}
    for n in onnx_model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return Result(
        spec.name,
        spec.arch,
        count_params(model),
        (model_dir / "model.onnx").stat().st_size,
        acc_t,
        acc_o,
        diff,
        "[N," + ",".join(map(str, spec.sample_shape)) + "]",
        ops,
    )


# --------------------------------------------------------------------------- README


README_TEMPLATE = """\
# Sample models

Generated by `tools/make_samples.py` -- run `make samples` (that is,
`python tools/make_samples.py --out sample_models`; needs the dev-only `samples`
extra: torch + scikit-learn). Do not edit by hand.

Three small float32 classifiers for scikit-learn's bundled *digits* data set,
each written node by node with `onnx.helper` from the trained torch weights
(opset {opset}, IR version {ir}). Input `input` has a symbolic batch dim `N`;
output `logits` is `[N,10]`. Every node has a unique readable name and all
weights are initializers. Parameters are trainable parameters (BatchNorm
running statistics not counted).

| model | input | parameters | model.onnx size | ops |
|---|---|---:|---:|---|
{model_rows}

Architectures:

{arch_rows}

## Data

- Source: `sklearn.datasets.load_digits()` (1797 8x8 images, 10 classes),
  bundled with scikit-learn, no download.
- Preprocessing: pixel values / 16 → [0, 1], then 8x8 → 16x16 bilinear
  upsampling (`torch.nn.functional.interpolate(mode="bilinear",
  align_corners=False)`).
- Split: a fixed permutation from `np.random.default_rng({seed})`; its first
  {n_eval} images are **eval** (never used for training or calibration), the other
  {n_train} are **train**; **calib** is {n_calib} images drawn from train with the
  same generator.
- Each model folder holds `calib/s00000.npy … s{last_calib:05d}.npy` and
  `eval/s00000.npy … s{last_eval:05d}.npy`, one float32 sample per file without
  the batch dim (`(1,16,16)` for the CNNs, `(16,16)` for the transformer), plus
  `eval/labels.npy` (int64 labels in sorted file-name order). All three models
  use the same images.
- Training: torch, Adam with a cosine learning-rate schedule, cross-entropy,
  batch 32, fixed seeds, single-threaded deterministic CPU kernels.

## Float accuracy on eval/ ({n_eval} samples)

Measured with onnxruntime (CPU) on the files in `eval/`. The torch model gives
the same accuracy; the last column is the largest |torch - onnxruntime| logit
difference.

| model | onnxruntime | torch | max abs logit diff |
|---|---:|---:|---:|
{acc_rows}

Regenerate with `make samples`. Re-running reproduces the same split and data
files; the weights are deterministic for a given machine and torch build but may
differ in the last bits elsewhere.

## `digits_qat`: a quantization-aware-trained export

Written by `tools/make_qat_sample.py` (also run by `make samples`), with its own
`digits_qat/README.md`: Conv(1→16)+ReLU → MaxPool → Conv(16→32)+ReLU → MaxPool →
Linear(512→128)+ReLU → Linear(128→10), trained in float, then with PyTorch eager
QAT (`torch.ao.quantization.prepare_qat`, FakeQuantize: uint8 activations, int8
symmetric per-channel weights) on the same split, and exported with
`torch.onnx.export` (opset 13) as a QDQ model with float32 weights behind
QuantizeLinear -> DequantizeLinear pairs. Same `calib/` and `eval/` images.
"""


def write_readme(out: Path, results: list[Result], n_train: int) -> None:
    """Write ``<out>/README.md`` describing the models, the data and the accuracies."""
    model_rows = []
    for r in results:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(r.op_counts.items()))
        size = f"{r.size_bytes / 1024:.1f} KiB"
        model_rows.append(
            f"| `{r.name}` | `{r.input_shape}` | {r.params:,} | {size} | {ops} |"
        )
    text = README_TEMPLATE.format(
        opset=OPSET,
        ir=IR_VERSION,
        model_rows="\n".join(model_rows),
        arch_rows="\n".join(f"- `{r.name}`: {r.arch}" for r in results),
        seed=SEED,
        n_eval=N_EVAL,
        n_train=n_train,
        n_calib=N_CALIB,
        last_calib=N_CALIB - 1,
        last_eval=N_EVAL - 1,
        acc_rows="\n".join(
            f"| `{r.name}` | {r.acc_ort:.1%} | {r.acc_torch:.1%} | {r.max_abs_diff:.1e} |"
            for r in results
        ),
    )
    (out / "README.md").write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--out", type=Path, default=Path("sample_models"), help="output folder"
    )
    return parser.parse_args(argv)


def summary(results: list[Result], out: Path) -> str:
    """Format the final one-table summary printed by :func:`main`."""
    head = ("model", "params", "KiB", "acc torch", "acc ort", "max|diff|")
    rows = [f"{head[0]:<20} {head[1]:>7} {head[2]:>6} {head[3]:>9} {head[4]:>8} {head[5]:>9}"]
    for r in results:
        rows.append(
            f"{r.name:<20} {r.params:>7,} {r.size_bytes / 1024:>6.1f} "
            f"{r.acc_torch:>9.1%} {r.acc_ort:>8.1%} {r.max_abs_diff:>9.1e}"
        )
    rows.append(f"wrote {len(results)} models with calib/ and eval/ data to {out}/")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Build every sample model into ``--out`` and print a summary table."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    images, labels = load_images()
    split = make_split(len(images))
    args.out.mkdir(parents=True, exist_ok=True)
    results = [build_one(spec, args.out, images, labels, split) for spec in SPECS]
    write_readme(args.out, results, len(split[0]))
    print(summary(results, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
