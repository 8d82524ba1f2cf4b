"""Activation equalization between float islands (`passes.equalize_activations`).

A pointwise Conv whose output channels differ 50x in range, read through a float
HardSwish and its affine ops, or through a Relu, by a depthwise Conv: one per-tensor
uint8 scale leaves the narrow channels a few levels, and the depthwise Conv passes that
noise on undiluted.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import qconvert
from qconvert import testing
from qconvert.config import QuantizeConfig
from qconvert.passes import equalize_activations
from qconvert.passes.equalize_activations import (
    EqualizeActivationsPass,
    activation_sites,
    channel_absmax,
    rescaled_values,
)
from qconvert.runtime import make_session
from qconvert.testing._build import checked_model, random_weights


def _samples(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"input": rng.standard_normal((1, 4, 16, 16)).astype(np.float32)} for _ in range(count)
    ]


def _absmax(model, names, samples):
    proto = ir.to_proto(model)
    for name in names:
        proto.graph.output.add().name = name
    session = make_session(proto.SerializeToString())
    return channel_absmax(
        (dict(zip(names, session.run(names, s), strict=True)) for s in samples), names
    )


def test_sites_are_the_tensors_both_sides_absorb_a_scale():
    model = ir.from_proto(testing.pointwise_hardswish_depthwise())
    names = {site.name for site in activation_sites(model)}
    # h: Conv writes it, a Mul reads it; t2: the affine writes it, a depthwise Conv reads it.
    # d is read by a plain Conv, which mixes channels: left alone.
    assert names == {"h", "t2"}


def test_a_relu_carries_the_scale_to_the_conv_before_it():
    # Relu(x * s) = Relu(x) * s for s > 0: the Conv before the Relu takes s, the depthwise
    # Convs after it undo it; both the Conv's output and the Relu's carry scaled channels.
    model = ir.from_proto(testing.pointwise_two_depthwise(activation="Relu"))
    sites = activation_sites(model)
    assert [site.name for site in sites] == ["a"]
    assert [node.op_type for node, _ in sites[0].producer] == ["Conv", "Conv"]
    assert rescaled_values(model) == {"h", "a"}
    # A Sigmoid is not positively homogeneous: no site.
    assert (
        activation_sites(ir.from_proto(testing.pointwise_two_depthwise(activation="Sigmoid")))
        == []
    )


def test_a_relu_whose_input_is_read_elsewhere_stops_the_scale():
    # h is read by the Relu and by the Add: scaling h's channels would reach the Add.
    rng = np.random.default_rng(0)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        relu_skip (float[N,4,8,8] input) => (float[N,4,8,8] output) {
            h = Conv <kernel_shape = [1,1]> (input, w1, b1)
            a = Relu (h)
            d = Conv <pads = [1,1,1,1], kernel_shape = [3,3], group = 4> (a, w2)
            output = Add (d, h)
        }
    """
    proto = checked_model(
        text,
        {
            "w1": random_weights(rng, 4, 4, 1, 1),
            "b1": random_weights(rng, 4),
            "w2": random_weights(rng, 4, 1, 3, 3),
        },
    )
    assert activation_sites(ir.from_proto(proto)) == []


def test_equalizing_keeps_the_function_and_evens_the_channels():
    proto = testing.pointwise_hardswish_depthwise(spread=20.0)  # within MAX_SCALE
    model = ir.from_proto(proto)
    samples = _samples(8, seed=1)
    before = _absmax(model, ["h", "t2"], samples)
    assert before["t2"].max() / before["t2"].min() > 10
    equalize = EqualizeActivationsPass(absmax=before)
    assert equalize(model).modified
    assert sorted(equalize.tensors) == ["h", "t2"]
    reference = make_session(proto.SerializeToString())
    changed = make_session(ir.to_proto(model).SerializeToString())
    for feeds in samples:
        np.testing.assert_allclose(
            changed.run(None, feeds)[0], reference.run(None, feeds)[0], rtol=1e-4, atol=1e-5
        )
    after = _absmax(model, ["h", "t2"], samples)
    for name in ("h", "t2"):
        assert after[name].max() / after[name].min() < 1.01


@pytest.mark.parametrize("activation", ["", "Relu"])
def test_equalize_lifts_the_int8_output(tmp_path, monkeypatch, activation):
    """A pointwise Conv read by two depthwise Convs (no pair for weight equalization).

    Through a Relu, the Relu's output is the tensor quantized (the Relu fuses into the
    Conv before it) and the one whose channels equalization evens.
    """
    proto = testing.pointwise_two_depthwise(activation=activation)
    model = testing.save(proto, tmp_path / "m.onnx")
    data = testing.write_samples(tmp_path / "calib", _samples(16, seed=2))
    held_out = _samples(8, seed=3)

    def quantized(name: str) -> float:
        out = tmp_path / f"{name}.onnx"
        qconvert.quantize(
            model,
            out,
            data=data,
            method="minmax",
            recipe="fast",
            config=QuantizeConfig(equalize=name != "plain"),
        )
        return testing.output_sqnr(model, out, held_out)

    plain, equalized = quantized("plain"), quantized("equalized")
    monkeypatch.setattr(equalize_activations, "channel_scales", np.ones_like)
    weights_only = quantized("weights_only")
    assert weights_only == plain  # no Conv -> Conv pair: weight equalization does nothing
    assert equalized > plain + 5.0, (plain, equalized)


def test_per_tensor_weights_are_left_alone(tmp_path):
    model = testing.save(testing.pointwise_two_depthwise(), tmp_path / "m.onnx")
    data = testing.write_samples(tmp_path / "calib", _samples(16, seed=2))
    report = qconvert.quantize(
        model,
        tmp_path / "q.onnx",
        data=data,
        recipe="fast",
        config=QuantizeConfig(equalize=True, per_channel=False),
    )
    assert not any("Activation equalization" in note for note in report.conversion.notes)
