"""`auto`'s check scores plans against float outputs calibration computed already.

The calibration session runs the float model on every sample; it keeps the outputs of
the first `AUTO_CHECK_SAMPLES`, and the check takes them instead of building a float
session and running those samples again. The outputs are the float model's, and the
model written is the same bytes either way.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from conftest import sha256
from test_auto_method import _one_op_model, _samples_with_one_outlier

import qconvert
from qconvert import testing
from qconvert.calibration import CollectSettings
from qconvert.calibration.collect import KeptOutputs, collect_statistics
from qconvert.calibration.graphs import tensors_to_calibrate
from qconvert.dataset import Sample
from qconvert.pipelines.calibrate import calibration_model
from qconvert.sensitivity import Evaluator


def test_calibration_keeps_the_float_outputs_of_the_first_samples(tmp_path):
    model = testing.conv_bn_relu()
    samples = [testing.random_inputs(model, seed=i) for i in range(8)]
    calibrated = calibration_model(ir.serde.deserialize_model(model))
    session = ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    for runs in (1, 2):  # batches in line, and two at once on the one session
        kept = KeptOutputs(3)
        collect_statistics(
            calibrated,
            [Sample(f"s{i}", feeds) for i, feeds in enumerate(samples)],
            tensors_to_calibrate(calibrated),
            settings=CollectSettings(concurrent_runs=runs),
            kept=kept,
        )
        assert kept.names == ("logits",)
        outputs = kept.complete()
        assert outputs is not None and len(outputs) == 3
        for feeds, (logits,) in zip(samples, outputs, strict=False):
            expected = session.run(["logits"], feeds)[0]
            np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_outputs_past_their_bound_or_in_batches_are_not_kept(tmp_path, monkeypatch):
    model = testing.conv_bn_relu()
    samples = [Sample(f"s{i}", testing.random_inputs(model, seed=i)) for i in range(4)]
    calibrated = calibration_model(ir.serde.deserialize_model(model))
    tensors = tensors_to_calibrate(calibrated)
    batched = KeptOutputs(2)
    collect_statistics(
        calibrated, samples, tensors, settings=CollectSettings(batch_size=2), kept=batched
    )
    assert batched.complete() is None
    monkeypatch.setattr(KeptOutputs, "MAX_BYTES", 0)
    bounded = KeptOutputs(2)
    collect_statistics(calibrated, samples, tensors, kept=bounded)
    assert bounded.complete() is None and bounded.runs == {}


def test_a_sequence_output_is_not_kept(tmp_path):
    model = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 13]>
        g (float[4,3] x) => (seq(float[?,3]) y) {
            m = MatMul (x, w)
            y = SplitToSequence <axis = 0> (m, parts)
        }"""
    )
    model.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(np.eye(3, dtype=np.float32), "w"),
            onnx.numpy_helper.from_array(np.array([1, 3], np.int64), "parts"),
        ]
    )
    calibrated = calibration_model(ir.serde.deserialize_model(model))
    samples = [Sample(f"s{i}", {"x": np.full((4, 3), i, np.float32)}) for i in range(3)]
    kept = KeptOutputs(2)
    observers = collect_statistics(
        calibrated, samples, tensors_to_calibrate(calibrated), kept=kept
    )
    assert observers and kept.complete() is None


def test_auto_check_takes_calibrations_float_outputs_and_writes_the_same_bytes(
    tmp_path, monkeypatch
):
    # The Sigmoid model: auto clips an outlier, so the check scores both plans.
    model = testing.save(_one_op_model("Sigmoid"), tmp_path / "model.onnx")
    data = _samples_with_one_outlier(tmp_path / "data")
    references = []
    real_init = Evaluator.__init__

    def recorded(self, float_model, *args, **kwargs):
        references.append(kwargs.get("reference") is not None)
        real_init(self, float_model, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "__init__", recorded)
    notes = {}
    for name in ("taken", "run"):
        if name == "run":  # nothing kept: the check runs the float model itself
            monkeypatch.setattr(KeptOutputs, "MAX_BYTES", 0)
        report = tmp_path / f"{name}.json"
        qconvert.quantize(
            model, tmp_path / f"{name}.onnx", data=data, report=report, recipe="fast"
        )
        conversion = json.loads(report.read_text())["conversion"]
        notes[name] = [n for n in conversion["notes"] if n.startswith("Range method auto")]
    assert references == [True, False]
    assert len(notes["taken"]) == 1 and "clipped" in notes["taken"][0]
    assert notes["taken"] == notes["run"]
    assert sha256(tmp_path / "taken.onnx") == sha256(tmp_path / "run.onnx")
