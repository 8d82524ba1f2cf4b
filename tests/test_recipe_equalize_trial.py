"""The recipe's equalization trial re-measures only what equalization changes.

Equalization rescales the channels of the tensors between its pairs; every other tensor
is the same float function of the input. The trial calibrates those few tensors again
and takes the rest (statistics, input means, the roundings of the layers it left alone)
from the trials before it. These tests check the first claim in onnxruntime, and that
the trial then scores the candidate a full re-measure scores, and the refit writes the
same bytes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from conftest import sha256

import qconvert
from qconvert import testing
from qconvert.layers import expose
from qconvert.passes import adaround as adaround_pass
from qconvert.pipelines import quantize_stages as quantize_pipeline
from qconvert.pipelines import recipe, weight_passes
from qconvert.recipe_fidelity import Fidelity
from qconvert.testing._build import checked_model

SAMPLES = 48


def _pair_then_more() -> onnx.ModelProto:
    """Conv a -> Relu -> Conv b (a pair) -> Relu -> MaxPool -> Conv c -> Relu -> Gemm.

    a's output channels differ in range by 100x, so equalization moves them; c and the
    Gemm read tensors it leaves alone.
    """
    rng = np.random.default_rng(0)
    w_a = rng.standard_normal((8, 3, 3, 3)) * np.logspace(-1, 1, 8)[:, None, None, None]
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        pair_then_more (float[N,3,16,16] input) => (float[N,10] logits) {
            h1 = Conv <pads = [1,1,1,1], kernel_shape = [3,3]> (input, w_a, b_a)
            a1 = Relu (h1)
            h2 = Conv <pads = [1,1,1,1], kernel_shape = [3,3]> (a1, w_b, b_b)
            a2 = Relu (h2)
            p2 = MaxPool <kernel_shape = [2,2], strides = [2,2]> (a2)
            h3 = Conv <pads = [1,1,1,1], kernel_shape = [3,3]> (p2, w_c, b_c)
            a3 = Relu (h3)
            pooled = GlobalAveragePool (a3)
            flat = Flatten (pooled)
            logits = Gemm <transB = 1> (flat, w_d, b_d)
        }
    """
    weights = {
        "w_a": w_a,
        "b_a": rng.standard_normal(8) * 0.1,
        "w_b": rng.standard_normal((8, 8, 3, 3)) * 0.3,
        "b_b": rng.standard_normal(8) * 0.1,
        "w_c": rng.standard_normal((8, 8, 3, 3)) * 0.3,
        "b_c": rng.standard_normal(8) * 0.1,
        "w_d": rng.standard_normal((10, 8)) * 0.3,
        "b_d": rng.standard_normal(10) * 0.1,
    }
    model = checked_model(
        text, {name: np.asarray(array, np.float32) for name, array in weights.items()}
    )
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            node.name = {"h1": "a", "h2": "b", "h3": "c", "logits": "d"}[node.output[0]]
    return model


def _all_tensors(model: onnx.ModelProto, feeds) -> dict[str, np.ndarray]:
    names = [node.output[0] for node in model.graph.node]
    session = ort.InferenceSession(expose(model, names), providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, feeds), strict=True))


def test_equalization_rescales_only_the_tensors_it_names():
    model = _pair_then_more()
    equalized, _ = weight_passes.equalize_model(ir.serde.deserialize_model(model))
    rescaled = weight_passes.rescaled_by_equalization(equalized)
    assert rescaled == {"h1", "a1"}
    feeds = testing.random_inputs(model, seed=3)
    before = _all_tensors(model, feeds)
    after = _all_tensors(ir.serde.serialize_model(equalized), feeds)
    for name, values in before.items():
        scale = float(np.abs(values).max())
        moved = float(np.abs(after[name] - values).max()) / scale
        if name in rescaled:
            assert moved > 0.1, name  # channels scaled by up to sqrt(100)
        else:
            assert moved < 1e-5, (name, moved)


def _case(tmp_path):
    model = _pair_then_more()
    path = testing.save(model, tmp_path / "model.onnx")
    testing.write_samples(
        tmp_path / "calib", [testing.random_inputs(model, seed=i) for i in range(SAMPLES)]
    )
    return path


def test_the_equalization_trial_reuses_what_it_leaves_and_writes_the_same_bytes(
    tmp_path, monkeypatch
):
    # Every step is kept, so equalization is tried on top of weight rounding and bias
    # correction, and the refit writes the equalized model.
    monkeypatch.setattr(Fidelity, "improves", lambda self, other, top1_floor=0.0: True)
    monkeypatch.setattr(
        Fidelity,
        "better_on_balance",
        lambda self, other, top1_floor=0.0, min_gain_db=0.0: True,
    )
    path = _case(tmp_path)
    swept, recalibrated = [], []
    real_round = adaround_pass._round_layer
    monkeypatch.setattr(
        adaround_pass,
        "_round_layer",
        lambda node, *args: swept.append(node.name) or real_round(node, *args),
    )
    real_recalibrate = quantize_pipeline.recalibrate
    monkeypatch.setattr(
        quantize_pipeline,
        "recalibrate",
        lambda state, tensors: (
            recalibrated.append(tensors) or real_recalibrate(state, tensors)
        ),
    )
    reused = qconvert.quantize(path, tmp_path / "reused.onnx", data=tmp_path / "calib")
    story = reused.conversion.recipe
    assert story.kept == ("bias correction", "weight rounding", "equalization")
    assert recalibrated == [{"h1", "a1"}]
    reused_sweeps = list(swept)

    real_equalized = recipe._equalized
    monkeypatch.setattr(
        recipe,
        "_equalized",
        lambda base, stages, **options: real_equalized(
            base, stages, **options | {"reuse": False}
        ),
    )
    swept.clear()
    afresh = qconvert.quantize(path, tmp_path / "afresh.onnx", data=tmp_path / "calib")
    assert sha256(tmp_path / "reused.onnx") == sha256(tmp_path / "afresh.onnx")
    # The trial rounds again only the pair's layers; afresh it sweeps c as well.
    assert swept.count("c") == reused_sweeps.count("c") + 1
    assert all(swept.count(name) == reused_sweeps.count(name) for name in "abd")
    trial = {t.step: t for t in story.trials}["equalization"]
    full = {t.step: t for t in afresh.conversion.recipe.trials}["equalization"]
    assert abs(trial.after.sqnr_db - full.after.sqnr_db) < 0.01
