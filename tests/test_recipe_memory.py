"""What the default recipe holds between its steps (`recipe._forget_passed`).

Each built trial state can hold a prepared model of its own (the weight passes write new
weights). Once a step is decided, the states of the kept sets no later build asks for are
dropped, and the written bytes are those of a run that keeps them all.
"""

from __future__ import annotations

import gc
import weakref

from conftest import sha256
from test_recipe import conv_case

import qconvert
from qconvert.pipelines import calibration_stages, recipe


def test_states_of_passed_steps_are_freed_and_the_bytes_stay(tmp_path, monkeypatch):
    path = conv_case(tmp_path)
    qconvert.quantize(path, tmp_path / "kept.onnx", data=tmp_path / "calib")  # warm
    monkeypatch.setattr(recipe, "_forget_passed", lambda built, kept: None)
    qconvert.quantize(path, tmp_path / "all.onnx", data=tmp_path / "calib")
    monkeypatch.undo()

    real = recipe._forget_passed
    calls = []

    def forget(built, kept):
        dropped = [
            weakref.ref(state.prepared) for key, state in built.items() if key[0] != kept
        ]
        real(built, kept)
        gc.collect()
        calls.append(({key[0] for key in built}, kept, [ref() for ref in dropped]))

    monkeypatch.setattr(recipe, "_forget_passed", forget)
    qconvert.quantize(path, tmp_path / "kept.onnx", data=tmp_path / "calib", force=True)

    assert len(calls) == len(recipe.STEPS)  # once a step
    for sets, kept, _ in calls:
        assert sets <= {kept}  # only the current kept set's states are held
    # A weight pass's trial wrote a model of its own, and it is freed once passed (a
    # plan-only trial's model is the base's, still held).
    freed = [model for _, _, dropped in calls for model in dropped if model is None]
    assert freed
    assert sha256(tmp_path / "kept.onnx") == sha256(tmp_path / "all.onnx")


def test_the_refit_calibrates_the_prepared_model_and_writes_the_same_bytes(
    tmp_path, monkeypatch
):
    path = conv_case(tmp_path)
    prepared = []
    real = calibration_stages.calibration_model
    monkeypatch.setattr(
        calibration_stages,
        "calibration_model",
        lambda model: prepared.append(1) or real(model),
    )
    qconvert.quantize(path, tmp_path / "reused.onnx", data=tmp_path / "calib")
    reused = len(prepared)
    # As before: the refit's held-out samples prepared the float model again.
    monkeypatch.setattr(recipe, "prepares_alike", lambda model, config: False)
    qconvert.quantize(path, tmp_path / "again.onnx", data=tmp_path / "calib")

    assert len(prepared) - reused == reused + 1  # one preparation fewer in the refit
    assert sha256(tmp_path / "reused.onnx") == sha256(tmp_path / "again.onnx")
