"""Every scheme and format on the bundled sample models: loads, runs, keeps accuracy."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
from conftest import SAMPLES

import qconvert
from qconvert import QuantizeConfig, testing
from qconvert.runtime import make_session

MODELS = ("digits_cnn", "digits_dwsep", "digits_transformer")

# Accuracy drop allowed, in points, per scheme (None: loads and runs, no accuracy bound).
DROP_BOUNDS = {
    ("16x8", "qdq"): 0.5,
    ("fp16", "qdq"): 0.5,
    ("fp16-weights", "qdq"): 0.5,
    ("int8-dynamic", "qdq"): None,
    ("int8", "qop"): None,
}


@cache
def _eval_set(name: str) -> tuple[np.ndarray, np.ndarray]:
    folder = SAMPLES / name / "eval"
    inputs = np.stack([np.load(path) for path in sorted(folder.glob("s*.npy"))])
    return inputs, np.load(folder / "labels.npy")


def accuracy(model, name: str) -> float:
    """Top-1 accuracy in percent on the eval set, in one batched run (the models take N)."""
    inputs, labels = _eval_set(name)
    (logits,) = make_session(str(model)).run(None, {"input": inputs})
    return 100.0 * float(np.mean(np.argmax(logits, axis=1) == labels))


@cache
def float_accuracy(name: str) -> float:
    return accuracy(SAMPLES / name / "model.onnx", name)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Runs each (model, scheme, format) once: (output, report, accuracy in percent)."""
    done = {}

    def convert(name: str, scheme: str, fmt: str = "qdq"):
        key = (name, scheme, fmt)
        if key not in done:
            folder = SAMPLES / name
            out = tmp_path_factory.mktemp(name) / f"model.{scheme}.{fmt}.onnx"
            report = qconvert.quantize(
                folder / "model.onnx",
                out,
                data=folder / "calib",
                config=QuantizeConfig(scheme=scheme, format=fmt),
                recipe="fast",  # the schemes themselves, not the recipe's choices
            )
            done[key] = (out, report, accuracy(out, name))
        return done[key]

    return convert


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(("scheme", "fmt"), list(DROP_BOUNDS))
def test_every_scheme_loads_runs_and_keeps_accuracy(converted, name, scheme, fmt):
    _, report, converted_accuracy = converted(name, scheme, fmt)
    assert report.conversion.scheme == scheme
    assert converted_accuracy > 90.0  # it runs and still classifies digits
    bound = DROP_BOUNDS[(scheme, fmt)]
    if bound is not None:
        drop = float_accuracy(name) - converted_accuracy
        assert drop <= bound, f"{name} {scheme}: drop {drop:.2f} points"


def test_int8_dynamic_on_the_transformer_within_one_point(converted):
    out, report, dynamic_accuracy = converted("digits_transformer", "int8-dynamic")
    drop = float_accuracy("digits_transformer") - dynamic_accuracy
    assert drop <= 1.0, f"int8-dynamic transformer: drop {drop:.2f} points"
    ops = testing.count_ops(out)
    assert ops["MatMulInteger"] == report.conversion.quantized_ops["MatMul"] + 1  # + Gemm
    assert ops["MatMul"] == 4  # attention's activation x activation MatMuls stay float


@pytest.mark.parametrize("name", MODELS)
def test_qop_agrees_with_qdq_within_one_point(converted, name):
    _, _, qdq_accuracy = converted(name, "int8")
    qop_out, _, qop_accuracy = converted(name, "int8", "qop")
    gap = abs(qdq_accuracy - qop_accuracy)
    assert gap <= 1.0, f"{name}: qop and qdq differ by {gap:.2f} points"
    ops = testing.count_ops(qop_out)
    assert ops["QLinearConv"] + ops["QLinearMatMul"] > 0


@pytest.mark.parametrize("name", MODELS)
def test_16x8_is_written_at_opset_21(converted, name):
    _, report, _ = converted(name, "16x8")
    assert report.conversion.opset_after == 21
    assert any("slower than float" in note for note in report.conversion.notes)
