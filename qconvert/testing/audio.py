"""An audio front end built in code: an STFT as a Conv over the raw signal, its magnitude."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh


def stft_front_end(
    *,
    length: int | None = 152,
    hop: int = 16,
    kernel: int = 32,
    bins: int = 9,
    pads: int = 0,
    bias: bool = False,
    reflect: int = 0,
) -> onnx.ModelProto:
    """Unsqueeze -> Conv (STFT basis) -> real, imaginary Slices -> magnitude -> Conv -> Relu.

    The STFT Conv has one input channel, `2 * bins` output channels (Hann-windowed cosines
    then sines), kernel `kernel` and stride `hop`, as a voice-activity detector's front end.
    `length` None leaves the signal's length symbolic. `reflect` pads the signal by that
    many samples each side first, with amounts computed by ops on constants (Concat, Cast)
    as exporters write them, which shape inference does not evaluate.
    """
    rng = np.random.default_rng(11)
    t = np.arange(kernel)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * t / kernel)
    freqs = np.arange(bins)[:, None]
    basis = np.concatenate(
        [np.cos(2 * np.pi * freqs * t / kernel), -np.sin(2 * np.pi * freqs * t / kernel)]
    )
    inits = {
        "axis1": np.array([1], np.int64),
        "basis": (basis * window)[:, None, :],
        "re_start": np.array([0], np.int64),
        "re_end": np.array([bins], np.int64),
        "im_end": np.array([2 * bins], np.int64),
        "two": np.array(2.0),
        # The encoder weighs the quiet high bins up, as a trained one does.
        "enc_w": rng.standard_normal((4, bins, 3)) * np.linspace(0.1, 3.0, bins)[:, None],
        "enc_b": rng.standard_normal(4) * 0.1,
    }
    stft_inputs = ["signal", "basis"]
    if bias:
        inits["basis_b"] = rng.standard_normal(2 * bins) * 0.01
        stft_inputs.append("basis_b")
    nodes = [h.make_node("Unsqueeze", ["input", "axis1"], ["signal"], name="unsqueeze")]
    if reflect:
        inits["pad_before"] = np.array([0, reflect], np.int32)
        inits["pad_after"] = np.array([0, reflect], np.int32)
        nodes = [
            h.make_node(
                "Concat", ["pad_before", "pad_after"], ["pads32"], name="pads", axis=0
            ),
            h.make_node("Cast", ["pads32"], ["pads"], name="pads_cast", to=TensorProto.INT64),
            h.make_node("Pad", ["input", "pads"], ["padded"], name="reflect", mode="reflect"),
            h.make_node("Unsqueeze", ["padded", "axis1"], ["signal"], name="unsqueeze"),
        ]
    nodes += [
        h.make_node(
            "Conv", stft_inputs, ["spec"], name="stft", strides=[hop], pads=[pads, pads]
        ),
        h.make_node("Slice", ["spec", "re_start", "re_end", "axis1"], ["re"], name="re"),
        h.make_node("Slice", ["spec", "re_end", "im_end", "axis1"], ["im"], name="im"),
        h.make_node("Pow", ["re", "two"], ["re2"], name="re_pow"),
        h.make_node("Pow", ["im", "two"], ["im2"], name="im_pow"),
        h.make_node("Add", ["re2", "im2"], ["power"], name="power"),
        h.make_node("Sqrt", ["power"], ["magnitude"], name="magnitude"),
        h.make_node("Conv", ["magnitude", "enc_w", "enc_b"], ["enc"], name="enc", pads=[1, 1]),
        h.make_node("Relu", ["enc"], ["output"], name="relu"),
    ]
    graph = h.make_graph(
        nodes,
        "stft_front_end",
        [h.make_tensor_value_info("input", TensorProto.FLOAT, ["N", length or "L"])],
        [h.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4, "F"])],
        [
            nh.from_array(v if v.dtype.kind == "i" else np.asarray(v, np.float32), k)
            for k, v in inits.items()
        ],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def tones(count: int, *, rows: int = 4, length: int = 152, seed: int = 0) -> list[dict]:
    """Signals of a loud low tone and a quiet high one, for `stft_front_end`.

    Their levels differ by 30 dB, and the rows' levels span 20 dB more, so the spectrum's
    bins differ widely in range.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    samples = []
    for _ in range(count):
        level = 10 ** rng.uniform(-1, 0, size=(rows, 1))
        low = rng.uniform(0.01, 0.06, size=(rows, 1))
        high = rng.uniform(0.15, 0.25, size=(rows, 1))
        wave = np.sin(2 * np.pi * low * t) + 0.03 * np.sin(2 * np.pi * high * t)
        noise = rng.standard_normal((rows, length)) * 0.003
        samples.append({"input": (level * wave + noise).astype(np.float32)})
    return samples
