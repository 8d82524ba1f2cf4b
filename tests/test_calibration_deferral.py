"""`quantize --data` calibrates without the tensors only a clamp reads, and the model is
the one a full calibration gives; a plan that reads one calibrates every tensor again."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qconvert import api, testing
from qconvert.calibration import tensors_to_calibrate
from qconvert.calibration.deferral import (
    DeferredTensorsNeeded,
    RecordingRanges,
    deferrable_tensors,
)
from qconvert.config import QuantizeConfig
from qconvert.pipelines import calibration_stages

BRANCHED = """
    <ir_version: 8, opset_import: ["" : 17]>
    branched (float[N,4,8,8] input) => (float[N,4,8,8] output) {
        h = Conv <pads = [1,1,1,1], kernel_shape = [3,3]> (input, w1)
        a = Relu (h)
        s = Add (a, h)
        output = Conv <pads = [1,1,1,1], kernel_shape = [3,3]> (s, w2)
    }
"""


def _conv_clamp_conv(clip: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    return testing.conv_relu_conv(
        rng.normal(0, 0.2, (16, 16, 3, 3)),
        rng.normal(0, 0.1, 16),
        rng.normal(0, 0.2, (16, 16, 3, 3)),
        clip=clip,
    )


def _deferrable(proto: onnx.ModelProto) -> frozenset[str]:
    model = ir.serde.deserialize_model(proto)
    return deferrable_tensors(model, tensors_to_calibrate(model))


def _case(tmp_path, proto: onnx.ModelProto, samples: int = 8):
    model = testing.save(proto, tmp_path / "model.onnx")
    feeds = [testing.random_inputs(proto, seed=seed) for seed in range(samples)]
    return model, testing.write_samples(tmp_path / "calib", feeds)


def test_a_tensor_only_a_relu_reads_is_deferrable_and_a_clips_is_not():
    assert _deferrable(_conv_clamp_conv()) == {"h"}
    assert _deferrable(_conv_clamp_conv(clip=True)) == frozenset()


def test_a_tensor_other_nodes_or_the_caller_read_is_not():
    rng = np.random.default_rng(0)
    branched = onnx.parser.parse_model(BRANCHED)
    for name in ("w1", "w2"):
        array = rng.normal(0, 0.5, (4, 4, 3, 3)).astype(np.float32)
        branched.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    assert _deferrable(branched) == frozenset()  # the Add reads it too
    exposed = _conv_clamp_conv()
    exposed.graph.output.append(onnx.helper.make_tensor_value_info("h", 1, None))
    assert _deferrable(exposed) == frozenset()  # a graph output


def test_recording_ranges_notes_lookups_of_deferred_tensors_only():
    ranges = RecordingRanges({"a": 1.0}, frozenset({"h"}))
    assert "a" in ranges and ranges.get("a") == 1.0
    assert "other" not in ranges and ranges.get("other") is None
    ranges.check()  # a missing tensor that was never deferred is not a deferral's
    assert "h" not in ranges
    assert ranges.get("h") is None
    with pytest.raises(DeferredTensorsNeeded) as raised:
        ranges.check()
    assert raised.value.names == {"h"}


@pytest.fixture
def calibrations(monkeypatch):
    """The tensors each calibration of `quantize` recorded, in order."""
    recorded: list[set[str]] = []
    collect = calibration_stages.collect_calibration

    def recording(*args, **kwargs):
        calibration = collect(*args, **kwargs)
        recorded.append(set(calibration.observers))
        return calibration

    monkeypatch.setattr(calibration_stages, "collect_calibration", recording)
    return recorded


@pytest.mark.parametrize("clip", [False, True], ids=["relu", "clip"])
def test_quantize_data_skips_them_and_writes_the_full_calibrations_model(
    tmp_path, calibrations, clip
):
    model, data = _case(tmp_path, _conv_clamp_conv(clip=clip))
    calib = tmp_path / "model.calib.json"
    api.calibrate(model, data, output=calib)
    api.quantize(model, tmp_path / "data.onnx", data=data, recipe="fast")
    api.quantize(model, tmp_path / "calib.onnx", calib=calib, recipe="fast")
    assert len(calibrations) == 1
    assert ("h" in calibrations[0]) is clip and {"input", "a"} <= calibrations[0]
    assert (tmp_path / "data.onnx").read_bytes() == (tmp_path / "calib.onnx").read_bytes()


def test_an_excluded_clamps_input_is_calibrated_at_once(tmp_path, calibrations, caplog):
    # An excluded Relu stays a node of its own: the Conv before it is quantized on its
    # own output. The exclusion is known before calibrating, so that output is recorded.
    model, data = _case(tmp_path, _conv_clamp_conv())
    calib = tmp_path / "model.calib.json"
    api.calibrate(model, data, output=calib)
    config = QuantizeConfig(exclude=("Relu",))
    with caplog.at_level(logging.INFO, logger="qconvert"):
        api.quantize(model, tmp_path / "data.onnx", data=data, config=config, recipe="fast")
    api.quantize(model, tmp_path / "calib.onnx", calib=calib, config=config, recipe="fast")
    assert [("h" in tensors) for tensors in calibrations] == [True]
    assert "calibrating every tensor" not in caplog.text
    assert (tmp_path / "data.onnx").read_bytes() == (tmp_path / "calib.onnx").read_bytes()


def test_a_plan_that_reads_a_deferred_tensor_calibrates_every_tensor(
    tmp_path, calibrations, caplog, monkeypatch
):
    # The safety net for a rule that reads a tensor the deferral did not foresee: here
    # the deferral is made to leave out the Relu's output, which every plan quantizes.
    model, data = _case(tmp_path, _conv_clamp_conv())
    calib = tmp_path / "model.calib.json"
    api.calibrate(model, data, output=calib)
    deferred = calibration_stages._deferred
    monkeypatch.setattr(
        calibration_stages,
        "_deferred",
        lambda state, calibrated: (
            deferred(state, calibrated) | {"a"} if state.defer else frozenset()
        ),
    )
    with caplog.at_level(logging.INFO, logger="qconvert"):
        api.quantize(model, tmp_path / "data.onnx", data=data, recipe="fast")
    api.quantize(model, tmp_path / "calib.onnx", calib=calib, recipe="fast")
    assert [("a" in tensors) for tensors in calibrations] == [False, True]
    assert "calibrating every tensor" in caplog.text
    assert (tmp_path / "data.onnx").read_bytes() == (tmp_path / "calib.onnx").read_bytes()


def test_symmetric_activations_calibrate_every_tensor_at_once(tmp_path, calibrations):
    # A zero point in the middle cannot perform a Relu: every plan reads the Conv output.
    model, data = _case(tmp_path, _conv_clamp_conv())
    api.quantize(
        model,
        tmp_path / "out.onnx",
        data=data,
        config=QuantizeConfig(scheme="16x8"),
        recipe="fast",
    )
    assert len(calibrations) == 1 and "h" in calibrations[0]
