"""Streamed int4: the next weight quantized while one is written; a load-only verify."""

from __future__ import annotations

import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qconvert
from qconvert import int4_grams, testing
from qconvert.config import QuantizeConfig
from qconvert.errors import VerificationError
from qconvert.int4_grams import GroupedGrams
from qconvert.int4_rounding import Grams
from qconvert.streaming import Lookahead
from qconvert.verify import verify_loads

LOAD_NOTE = "Verified by the ONNX checker and an onnxruntime load, without a run"


def _recording(calls: list[tuple[str, str]]):
    def compute(entry: str) -> str:
        calls.append((entry, threading.current_thread().name))
        return entry.upper()

    return compute


def test_lookahead_computes_each_entry_once_the_next_one_on_a_worker_thread():
    calls: list[tuple[str, str]] = []
    source = Lookahead(_recording(calls), key=lambda entry: entry)
    for entry in ("a", "b", "a", "c"):  # a repeat keeps the first place
        source.expect(entry)
    results = [source(entry) for entry in ("a", "a", "b", "b", "c")]
    assert results == ["A", "A", "B", "B", "C"]
    assert [entry for entry, _ in calls] == ["a", "b", "c"]
    main = threading.current_thread().name
    assert calls[0][1] == main
    assert all(thread.startswith("qconvert") for _, thread in calls[1:])


def test_lookahead_asked_out_of_order_gives_the_entry_asked_for():
    calls: list[tuple[str, str]] = []
    source = Lookahead(_recording(calls), key=lambda entry: entry)
    for entry in ("a", "b", "c"):
        source.expect(entry)
    assert source("a") == "A"
    assert source("c") == "C"  # "b", started early, is dropped
    assert source("b") == "B"  # computed again: the early result was not kept
    assert [entry for entry, _ in calls].count("b") == 2


def test_a_failure_computed_ahead_surfaces_when_its_entry_is_asked_for():
    def compute(entry: str) -> str:
        if entry == "b":
            raise ValueError("no b")
        return entry

    source = Lookahead(compute, key=lambda entry: entry)
    source.expect("a")
    source.expect("b")
    assert source("a") == "a"
    with pytest.raises(ValueError, match="no b"):
        source("b")


def _mlp(seed: int = 0) -> onnx.ModelProto:
    """x (2, 64) -> MatMul 64x96 -> Relu -> MatMul 96x32 -> MatMul 32x64."""
    rng = np.random.default_rng(seed)
    shapes = [(64, 96), (96, 32), (32, 64)]
    weights = [
        numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.1, f"w{i}")
        for i, s in enumerate(shapes)
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h0"], name="m0"),
        helper.make_node("Relu", ["h0"], ["r0"], name="relu"),
        helper.make_node("MatMul", ["r0", "w1"], ["h1"], name="m1"),
        helper.make_node("MatMul", ["h1", "w2"], ["y"], name="m2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(path, feeds) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_external_data_without_data_is_written_as_in_memory_and_verified_by_a_load(tmp_path):
    model = _mlp()
    inline = testing.save(model, tmp_path / "inline.onnx")
    (tmp_path / "ext").mkdir()
    external = testing.save_with_external_data(model, tmp_path / "ext" / "mlp.onnx")
    # MatMulNBits both ways: the default for the model in external data
    config = QuantizeConfig(scheme="int4", block_size=32, int4_kernel="nbits")
    reports, outputs = {}, {}
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)}
    for name, path in (("inline", inline), ("external", external)):
        out = tmp_path / f"{name}.int4.onnx"
        reports[name] = qconvert.quantize(path, out, config=config)
        outputs[name] = _run(out, feeds)
    assert (tmp_path / "external.int4.onnx.data").exists()
    # the look-ahead changes when a weight is quantized, not its values
    np.testing.assert_array_equal(outputs["inline"], outputs["external"])
    reference = _run(inline, feeds)
    error = np.linalg.norm(outputs["external"] - reference) / np.linalg.norm(reference)
    assert error < 0.3  # three layers of 4-bit weights, not a broken model
    assert any(LOAD_NOTE in note for note in reports["external"].conversion.notes)
    assert not any(LOAD_NOTE in note for note in reports["inline"].conversion.notes)


def test_verify_loads_refuses_a_model_onnxruntime_cannot_load(tmp_path):
    # MatMulNBits given float weights: valid to the checker (a contrib op), not to the runtime
    weight = numpy_helper.from_array(np.zeros((4, 1, 16), np.float32), "b")
    scales = numpy_helper.from_array(np.ones(4, np.float32), "s")
    node = helper.make_node(
        "MatMulNBits",
        ["x", "b", "s"],
        ["y"],
        domain="com.microsoft",
        K=32,
        N=4,
        bits=4,
        block_size=32,
    )
    graph = helper.make_graph(
        [node],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weight, scales],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
    )
    model.ir_version = 10
    path = testing.save_with_external_data(model, tmp_path / "bad.onnx")
    with pytest.raises(VerificationError) as caught:
        verify_loads(str(path))
    assert str(caught.value).startswith("onnxruntime cannot load the converted model: ")


def test_verify_loads_passes_a_written_int4_model(tmp_path):
    (tmp_path / "ext").mkdir()
    path = testing.save_with_external_data(_mlp(), tmp_path / "ext" / "mlp.onnx")
    out = tmp_path / "mlp.int4.onnx"
    qconvert.quantize(path, out, config=QuantizeConfig(scheme="int4", block_size=32))
    verify_loads(str(out))


def _inits(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_gram_matrices_measured_a_group_at_a_time_give_the_same_model(tmp_path, monkeypatch):
    path = testing.save(_mlp(), tmp_path / "mlp.onnx")
    rng = np.random.default_rng(2)
    samples = [{"x": rng.standard_normal((2, 64)).astype(np.float32)} for _ in range(8)]
    data = testing.write_samples(tmp_path / "calib", samples)
    # MatMulNBits: the int8 kernel's input-scale search walks the groups once more
    config = QuantizeConfig(scheme="int4", block_size=32, int4_kernel="nbits")
    whole = qconvert.quantize(path, tmp_path / "whole.onnx", data=data, config=config)
    # the budget of the widest input alone: x (64), r0 (96) and h1 (32) one pass each
    monkeypatch.setattr(int4_grams, "GRAM_BYTES", int4_grams.gram_bytes(96))
    grouped = qconvert.quantize(path, tmp_path / "grouped.onnx", data=data, config=config)
    expected, written = _inits(tmp_path / "whole.onnx"), _inits(tmp_path / "grouped.onnx")
    assert expected.keys() == written.keys()
    for name, array in expected.items():
        np.testing.assert_array_equal(array, written[name])
    note = "Layer-input Gram matrices measured a group at a time: 3 float passes"
    assert any(note in n for n in grouped.conversion.notes)
    assert not any(note[:40] in n for n in whole.conversion.notes)
    rounding = [n for n in grouped.conversion.notes if n.startswith("Rounding chosen")]
    assert rounding == [n for n in whole.conversion.notes if n.startswith("Rounding chosen")]
    assert "2 held-out sample(s) (fitted on 6)" in rounding[0]


def test_grouped_grams_hold_one_group_at_a_time_and_measure_each_when_first_read():
    widths = {"a": 64, "b": 48, "c": 32}
    measured: list[list[str]] = []

    def measure(group):
        measured.append(list(group))
        grams = Grams(fit_samples=6, held_samples=2)
        for name, k in group.items():
            grams.fit[name] = np.full((k, k), 1.0)
            grams.held[name] = np.full((k, k), 2.0)
        return grams

    budget = int4_grams.gram_bytes(64)
    grams = GroupedGrams(measure, widths, samples=8, budget=budget)
    assert grams.groups == [["a"], ["b", "c"]]  # 48^2 + 32^2 fit beside each other
    assert (grams.fit_samples, grams.held_samples) == (6, 2)
    assert measured == []  # nothing measured until read
    assert grams.fit["a"].shape == (64, 64)
    assert grams.held["a"][0, 0] == 2.0
    assert grams.fit.get("b").shape == (48, 48)
    assert "c" in grams.held
    assert measured == [["a"], ["b", "c"]]
    assert grams.peak_bytes <= budget
    grams.fit["a"]  # read again after its group was dropped: measured again
    assert grams.passes == 3
