"""Tensors whose statistics follow from another's are not read, and their statistics are
those a read of their own gives, bit for bit; the calibration file is written as json
writes it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qconvert.calibration import CollectSettings, collect_statistics, graphs, reducing
from qconvert.calibration.derived import derived_tensors
from qconvert.calibration.file import count_list
from qconvert.testing._build import checked_model, random_weights

# Every kind the module derives, and two it must not: a Relu of a derived tensor (a chain)
# and a Clip whose bound is a graph input.
CLAMPS = """
    <ir_version: 8, opset_import: ["" : 17]>
    clamps (float[1,4,16,16] input, float low) => (float[1,64] out, float[1,4,16,16] c2) {
        h = Conv <pads = [1,1,1,1], kernel_shape = [3,3]> (input, w1)
        r = Relu (h)
        g = Conv <pads = [1,1,1,1], kernel_shape = [3,3]> (r, w2)
        c = Clip (g, zero, six)
        l = Log (c)
        z = Relu (l)
        f = Flatten (g)
        fr = Relu (f)
        m = MatMul (f, w3)
        out = Clip (m, , half)
        c2 = Clip (g, low, six)
    }
"""


def _clamps_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    return checked_model(
        CLAMPS,
        {
            "w1": random_weights(rng, 4, 4, 3, 3),
            "w2": random_weights(rng, 4, 4, 3, 3),
            "w3": random_weights(rng, 1024, 64, scale=0.1),
            "zero": np.array(0.0, np.float32),
            "six": np.array(0.6, np.float32),
            "half": np.array(0.5, np.float32),
        },
    )


NAMES = ("input", "h", "r", "g", "c", "l", "z", "f", "fr", "m", "out", "c2")


def _samples(count: int = 6) -> list:
    from qconvert.dataset import Sample

    rng = np.random.default_rng(1)
    samples = []
    for index in range(count):
        image = rng.normal(0, 2, (1, 4, 16, 16)).astype(np.float32)
        image[0, 0, 0, :2] = [-0.0, 0.0]  # a signed zero (Log(0) gives an infinity)
        feeds = {"input": image, "low": np.array(-0.5, np.float32)}
        samples.append(Sample(source=f"s{index}", feeds=feeds))
    return samples


def test_the_outputs_of_relus_clips_and_reshapes_of_read_tensors_are_derived():
    proto = _clamps_model()
    dtypes = {name: onnx.TensorProto.FLOAT for name in NAMES}
    derived = derived_tensors(proto, NAMES, dtypes)
    assert {name: (d.source, d.low, d.high) for name, d in derived.items()} == {
        "r": ("h", 0.0, np.inf),
        "c": ("g", 0.0, pytest.approx(0.6)),
        "z": ("l", 0.0, np.inf),
        "f": ("g", -np.inf, np.inf),
        "out": ("m", -np.inf, 0.5),
    }
    # Not `fr`: its input is itself derived. Not `c2`: its bound is fed.
    # Nor a tensor that is not calibrated, nor one of another type.
    assert "r" not in derived_tensors(proto, ("h",), dtypes)
    assert (
        derived_tensors(proto, NAMES, {**dtypes, "h": onnx.TensorProto.DOUBLE}).get("r")
        is None
    )


def _observed(monkeypatch, derive: bool, settings: CollectSettings) -> dict:
    if not derive:
        monkeypatch.setattr(graphs, "derived_tensors", lambda *args: {})
    model = ir.serde.deserialize_model(_clamps_model())
    return collect_statistics(model, _samples(), NAMES, settings=settings)


@pytest.mark.parametrize("whole", ["none", "all"])
@pytest.mark.parametrize("histogram", [4, 1024])
def test_derived_statistics_are_those_a_read_gives_bit_for_bit(monkeypatch, whole, histogram):
    monkeypatch.setattr(reducing, "WHOLE_VALUES", -1 if whole == "none" else 10**9)
    settings = CollectSettings(histogram_values=histogram)
    with monkeypatch.context() as patched:
        read = _observed(patched, False, settings)
    derived = _observed(monkeypatch, True, settings)
    assert set(read) == set(derived) == set(NAMES)
    for name in NAMES:
        a, b = read[name], derived[name]
        state = (a.min, a.max, a.count, a.exponent, a.first_bin)
        assert state == (b.min, b.max, b.count, b.exponent, b.first_bin), name
        assert np.array_equal(a.bins, b.bins), name
        assert np.signbit(a.min) == np.signbit(b.min), name
    # The clamped ranges are real: the Clip's output stays within its bounds.
    assert derived["c"].max <= np.float32(0.6) and derived["c"].min >= 0.0
    # Log(0) is -inf, which counts as no value of `l`; every value of Relu(l) counts.
    assert derived["l"].count < derived["z"].count == 6 * 4 * 16 * 16


def test_derived_tensors_are_not_read_by_the_calibration_graph(monkeypatch):
    seen = {}
    original = reducing.reducing_graph

    def spy(proto, tensors, *args, **kwargs):
        seen["read"] = tuple(tensors)
        return original(proto, tensors, *args, **kwargs)

    monkeypatch.setattr(reducing, "reducing_graph", spy)
    _observed(monkeypatch, True, CollectSettings())
    assert set(seen["read"]) == set(NAMES) - {"r", "c", "z", "f", "out"}


@pytest.mark.parametrize(
    "counts",
    [[], [0], [7], [10, 0, 99, 100, 1023, 1024, 10**6], [2**62], list(range(3000))],
)
def test_counts_are_written_as_json_writes_them(counts):
    assert count_list(np.array(counts, np.int64)) == json.dumps(counts)


def test_negative_counts_are_refused():
    with pytest.raises(ValueError):
        count_list(np.array([1, -1]))
