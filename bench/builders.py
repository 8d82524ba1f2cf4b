"""Models built in code at realistic size, for speed and memory figures.

Weights are random but scaled as trained nets are (He-normal convolutions, BatchNorm with
unit-ish statistics, N(0, 0.02) transformer weights) and seeded, so every run builds the same
bytes. The BERT-style encoder takes its weights as a dict, so the same graph serves the
pretrained MiniLM (weights read from its safetensors file) and the random one.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class GraphBuilder:
    """Accumulates nodes and initializers with unique, readable names."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def const(self, stem: str, array: np.ndarray) -> str:
        name = self.name(stem)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs: object) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(
            helper.make_node(op_type, inputs, [out], name=out + "_node", **attrs)
        )
        return out

    def conv_bn(
        self,
        x: str,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        groups: int = 1,
        *,
        padded: bool = True,
    ) -> str:
        fan_in = cin // groups * k * k
        weight = self.rng.normal(0.0, math.sqrt(2.0 / fan_in), (cout, cin // groups, k, k))
        y = self.op(
            "Conv",
            [x, self.const("w", weight.astype(np.float32))],
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[k // 2 if padded else 0] * 4,
            group=groups,
        )
        scale = self.rng.uniform(0.5, 1.5, cout).astype(np.float32)
        bias = self.rng.normal(0.0, 0.1, cout).astype(np.float32)
        mean = self.rng.normal(0.0, 0.1, cout).astype(np.float32)
        var = self.rng.uniform(0.5, 1.5, cout).astype(np.float32)
        return self.op(
            "BatchNormalization",
            [y]
            + [
                self.const(n, a)
                for n, a in (("g", scale), ("b", bias), ("m", mean), ("v", var))
            ],
            epsilon=1e-5,
        )

    def same_pad(self, x: str, k: int, stride: int) -> str:
        """TensorFlow's "same" padding as an explicit Pad (as exporters of TF-style nets
        write it): (k - stride) zeros split with the extra one at the end, on an even size."""
        total = max(k - stride, 0)
        begin, end = total // 2, total - total // 2
        pads = np.array([0, 0, begin, begin, 0, 0, end, end], np.int64)
        return self.op("Pad", [x, self.const("pads", pads)], mode="constant")

    def relu6(self, x: str) -> str:
        return self.op(
            "Clip",
            [x, self.const("lo", np.float32(0.0)), self.const("hi", np.float32(6.0))],
        )

    def classifier_head(self, x: str, channels: int, classes: int = 1000) -> str:
        pooled = self.op("Flatten", [self.op("GlobalAveragePool", [x])])
        weight = self.rng.normal(0.0, math.sqrt(1.0 / channels), (classes, channels))
        return self.op(
            "Gemm",
            [
                pooled,
                self.const("fc_w", weight.astype(np.float32)),
                self.const("fc_b", np.zeros(classes, np.float32)),
            ],
            transB=1,
        )

    def model(
        self,
        inputs: list[onnx.ValueInfoProto],
        outputs: dict[str, tuple[str, list[int]]],
        name: str,
    ) -> onnx.ModelProto:
        for out_name, (tensor, _) in outputs.items():
            self.nodes.append(
                helper.make_node("Identity", [tensor], [out_name], name=out_name)
            )
        graph = helper.make_graph(
            self.nodes,
            name,
            inputs,
            [
                helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
                for n, (_, shape) in outputs.items()
            ],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        model.producer_name = "qconvert-bench"
        onnx.checker.check_model(model)
        return model


def _image_input(size: int = 224) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])


def resnet_style(seed: int = 0, size: int = 224) -> onnx.ModelProto:
    """A ResNet-18 layout: 7x7 stem, 4 stages of 2 basic blocks (64..512), 1000 classes."""
    g = GraphBuilder(seed)
    x = g.op("Relu", [g.conv_bn("input", 3, 64, 7, 2)])
    x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            y = g.op("Relu", [g.conv_bn(x, cin, cout, 3, stride)])
            y = g.conv_bn(y, cout, cout, 3)
            shortcut = g.conv_bn(x, cin, cout, 1, stride) if stride != 1 or cin != cout else x
            x = g.op("Relu", [g.op("Add", [y, shortcut])])
            cin = cout
    logits = g.classifier_head(x, cin)
    return g.model([_image_input(size)], {"logits": (logits, [1, 1000])}, "resnet_style")


def mobilenetv2_style(seed: int = 0, size: int = 224) -> onnx.ModelProto:
    """MobileNetV2 (width 1.0): inverted residuals with depthwise 3x3 convs and ReLU6."""
    g = GraphBuilder(seed)
    x = g.relu6(g.conv_bn("input", 3, 32, 3, 2))
    cin = 32
    for expand, cout, repeats, first_stride in (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ):
        for index in range(repeats):
            stride = first_stride if index == 0 else 1
            hidden = cin * expand
            y = x if expand == 1 else g.relu6(g.conv_bn(x, cin, hidden, 1))
            y = g.relu6(g.conv_bn(y, hidden, hidden, 3, stride, groups=hidden))
            y = g.conv_bn(y, hidden, cout, 1)
            x = g.op("Add", [x, y]) if stride == 1 and cin == cout else y
            cin = cout
    x = g.relu6(g.conv_bn(x, cin, 1280, 1))
    logits = g.classifier_head(x, 1280)
    return g.model([_image_input(size)], {"logits": (logits, [1, 1000])}, "mobilenetv2_style")


def efficientnet_lite_style(seed: int = 0, size: int = 224) -> onnx.ModelProto:
    """EfficientNet-Lite0 as a TF-to-ONNX export writes it: every Conv with a kernel above
    1x1 reads an explicit Pad ("same" padding), ReLU6, depthwise 3x3 and 5x5, no SE."""
    g = GraphBuilder(seed)

    def conv(x: str, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> str:
        if k > 1:
            x = g.same_pad(x, k, stride)
        return g.conv_bn(x, cin, cout, k, stride, groups, padded=False)

    x = g.relu6(conv("input", 3, 32, 3, 2))
    cin = 32
    for expand, k, first_stride, cout, repeats in (
        (1, 3, 1, 16, 1),
        (6, 3, 2, 24, 2),
        (6, 5, 2, 40, 2),
        (6, 3, 2, 80, 3),
        (6, 5, 1, 112, 3),
        (6, 5, 2, 192, 4),
        (6, 3, 1, 320, 1),
    ):
        for index in range(repeats):
            stride = first_stride if index == 0 else 1
            hidden = cin * expand
            y = x if expand == 1 else g.relu6(conv(x, cin, hidden, 1))
            y = g.relu6(conv(y, hidden, hidden, k, stride, groups=hidden))
            y = conv(y, hidden, cout, 1)
            x = g.op("Add", [x, y]) if stride == 1 and cin == cout else y
            cin = cout
    x = g.relu6(conv(x, cin, 1280, 1))
    logits = g.classifier_head(x, 1280)
    return g.model(
        [_image_input(size)], {"logits": (logits, [1, 1000])}, "efficientnet_lite_style"
    )


BERT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def random_bert_weights(
    seed: int = 0, layers: int = 6, hidden: int = 384, vocab: int = 30522
) -> dict[str, np.ndarray]:
    """BERT weights under the Hugging Face names, N(0, 0.02) as BERT initializes them."""
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> np.ndarray:
        return rng.normal(0.0, 0.02, shape).astype(np.float32)

    weights = {
        "embeddings.word_embeddings.weight": normal(vocab, hidden),
        "embeddings.position_embeddings.weight": normal(512, hidden),
        "embeddings.token_type_embeddings.weight": normal(2, hidden),
        "embeddings.LayerNorm.weight": np.ones(hidden, np.float32),
        "embeddings.LayerNorm.bias": np.zeros(hidden, np.float32),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name, (out, inp) in {
            "attention.self.query": (hidden, hidden),
            "attention.self.key": (hidden, hidden),
            "attention.self.value": (hidden, hidden),
            "attention.output.dense": (hidden, hidden),
            "intermediate.dense": (4 * hidden, hidden),
            "output.dense": (hidden, 4 * hidden),
        }.items():
            weights[p + name + ".weight"] = normal(out, inp)
            weights[p + name + ".bias"] = np.zeros(out, np.float32)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            weights[p + name + ".weight"] = np.ones(hidden, np.float32)
            weights[p + name + ".bias"] = np.zeros(hidden, np.float32)
    return weights


def bert_encoder(
    weights: dict[str, np.ndarray], *, seq_len: int = 128, heads: int = 12, eps: float = 1e-12
) -> onnx.ModelProto:
    """A BERT encoder (post-LN, GELU via Erf) with mean pooling over the attention mask.

    Outputs `last_hidden_state` [1, S, H] and `sentence_embedding` [1, H] (the
    sentence-transformers pooling: sum(x * mask) / sum(mask)).
    """
    g = GraphBuilder(0)
    hidden = weights["embeddings.LayerNorm.weight"].shape[0]
    layers = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("encoder.layer."))
    head_dim = hidden // heads

    def w(key: str, transpose: bool = False) -> str:
        array = weights[key].astype(np.float32)
        return g.const(key.replace(".", "_"), array.T.copy() if transpose else array)

    def linear(x: str, prefix: str) -> str:
        return g.op(
            "Add", [g.op("MatMul", [x, w(prefix + ".weight", True)]), w(prefix + ".bias")]
        )

    def layer_norm(x: str, prefix: str) -> str:
        return g.op(
            "LayerNormalization",
            [x, w(prefix + ".weight"), w(prefix + ".bias")],
            axis=-1,
            epsilon=eps,
        )

    def heads_view(x: str, perm: list[int]) -> str:
        shape = g.const("shape", np.array([1, seq_len, heads, head_dim], np.int64))
        return g.op("Transpose", [g.op("Reshape", [x, shape])], perm=perm)

    positions = g.const("position_ids", np.arange(seq_len, dtype=np.int64)[None, :])
    x = g.op("Gather", [w("embeddings.word_embeddings.weight"), "input_ids"])
    x = g.op(
        "Add", [x, g.op("Gather", [w("embeddings.position_embeddings.weight"), positions])]
    )
    x = g.op(
        "Add",
        [x, g.op("Gather", [w("embeddings.token_type_embeddings.weight"), "token_type_ids"])],
    )
    x = layer_norm(x, "embeddings.LayerNorm")

    mask = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    inverted = g.op("Sub", [g.const("one", np.float32(1.0)), mask])
    mask_bias = g.op(
        "Unsqueeze",
        [
            g.op("Mul", [inverted, g.const("neg", np.float32(-10000.0))]),
            g.const("axes", np.array([1, 2], np.int64)),
        ],
    )
    scale = g.const("scale", np.float32(1.0 / math.sqrt(head_dim)))
    for i in range(layers):
        p = f"encoder.layer.{i}."
        q = heads_view(linear(x, p + "attention.self.query"), [0, 2, 1, 3])
        k = heads_view(linear(x, p + "attention.self.key"), [0, 2, 3, 1])
        v = heads_view(linear(x, p + "attention.self.value"), [0, 2, 1, 3])
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), scale]), mask_bias])
        context = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        context = g.op(
            "Reshape",
            [
                g.op("Transpose", [context], perm=[0, 2, 1, 3]),
                g.const("shape", np.array([1, seq_len, hidden], np.int64)),
            ],
        )
        attention = linear(context, p + "attention.output.dense")
        x = layer_norm(g.op("Add", [attention, x]), p + "attention.output.LayerNorm")
        h = linear(x, p + "intermediate.dense")
        erf = g.op("Erf", [g.op("Div", [h, g.const("sqrt2", np.float32(math.sqrt(2.0)))])])
        h = g.op(
            "Mul",
            [
                g.op("Mul", [h, g.op("Add", [erf, g.const("one", np.float32(1.0))])]),
                g.const("half", np.float32(0.5)),
            ],
        )
        out = linear(h, p + "output.dense")
        x = layer_norm(g.op("Add", [out, x]), p + "output.LayerNorm")

    mask3 = g.op("Unsqueeze", [mask, g.const("axes", np.array([2], np.int64))])
    summed = g.op(
        "ReduceSum",
        [g.op("Mul", [x, mask3]), g.const("axes", np.array([1], np.int64))],
        keepdims=0,
    )
    count = g.op("ReduceSum", [mask3, g.const("axes", np.array([1], np.int64))], keepdims=0)
    embedding = g.op("Div", [summed, count])
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.INT64, [1, seq_len]) for n in BERT_INPUTS
    ]
    return g.model(
        inputs,
        {
            "last_hidden_state": (x, [1, seq_len, hidden]),
            "sentence_embedding": (embedding, [1, hidden]),
        },
        "bert_encoder",
    )


def tiny_cnn(seed: int = 0) -> onnx.ModelProto:
    """A small Conv/BN/ReLU net on 3x32x32 inputs with 10 classes: the `--quick` model."""
    g = GraphBuilder(seed)
    x = g.op("Relu", [g.conv_bn("input", 3, 16, 3, 2)])
    x = g.op("Relu", [g.conv_bn(x, 16, 32, 3, 2)])
    logits = g.classifier_head(x, 32, classes=10)
    return g.model([_image_input(32)], {"logits": (logits, [1, 10])}, "tiny_cnn")


# EfficientNet-Lite0's blocks: (repeats, kernel, first stride, expand ratio, out channels).
EFFICIENTNET_LITE0 = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)


def efficientnet_lite(
    weights: dict[str, np.ndarray], *, size: int = 224, eps: float = 1e-3
) -> onnx.ModelProto:
    """EfficientNet-Lite0 (ReLU6, no squeeze-excite) under the efficientnet_pytorch names.

    The weights come from TensorFlow's checkpoint, so every Conv pads as TensorFlow's "same"
    does: an explicit Pad node before the Conv, the odd pixel on the bottom/right for stride
    2 (what efficientnet_pytorch's static-same-padding Conv exports as).
    """
    g = GraphBuilder(0)
    spatial = {"input": size}

    def conv_bn(x: str, prefix: str, bn: str, stride: int = 1, groups: int = 1) -> str:
        weight = weights[prefix + ".weight"].astype(np.float32)
        k = weight.shape[-1]
        total = max((-(-spatial[x] // stride) - 1) * stride + k - spatial[x], 0)
        if total:
            lo, hi = total // 2, total - total // 2
            x_padded = g.op(
                "Pad", [x, g.const("pads", np.array([0, 0, lo, lo, 0, 0, hi, hi], np.int64))]
            )
            spatial[x_padded] = spatial[x] + total
        else:
            x_padded = x
        y = g.op(
            "Conv",
            [x_padded, g.const("w", weight)],
            kernel_shape=[k, k],
            strides=[stride, stride],
            group=groups,
        )
        y = g.op(
            "BatchNormalization",
            [y]
            + [
                g.const(n, weights[f"{bn}.{n}"].astype(np.float32))
                for n in ("weight", "bias", "running_mean", "running_var")
            ],
            epsilon=eps,
        )
        spatial[y] = -(-spatial[x] // stride)
        return y

    def relu6(x: str) -> str:
        out = g.relu6(x)
        spatial[out] = spatial[x]
        return out

    x = relu6(conv_bn("input", "_conv_stem", "_bn0", stride=2))
    block, cin = 0, 32
    for repeats, _, first_stride, expand, cout in EFFICIENTNET_LITE0:
        for index in range(repeats):
            p = f"_blocks.{block}."
            stride = first_stride if index == 0 else 1
            y = x if expand == 1 else relu6(conv_bn(x, p + "_expand_conv", p + "_bn0"))
            hidden = cin * expand
            y = relu6(conv_bn(y, p + "_depthwise_conv", p + "_bn1", stride, groups=hidden))
            y = conv_bn(y, p + "_project_conv", p + "_bn2")
            if stride == 1 and cin == cout:
                y = g.op("Add", [y, x])
                spatial[y] = spatial[x]
            x, cin, block = y, cout, block + 1
    x = relu6(conv_bn(x, "_conv_head", "_bn1"))
    pooled = g.op("Flatten", [g.op("GlobalAveragePool", [x])])
    logits = g.op(
        "Gemm",
        [
            pooled,
            g.const("fc_w", weights["_fc.weight"].astype(np.float32)),
            g.const("fc_b", weights["_fc.bias"].astype(np.float32)),
        ],
        transB=1,
    )
    return g.model([_image_input(size)], {"logits": (logits, [1, 1000])}, "efficientnet_lite0")
