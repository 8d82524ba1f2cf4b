"""The recipe's raise step: what a raise keeps float, what it costs, and how it is scored."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from test_recipe import quantize_outlier_stem

import qconvert
from qconvert import model as model_io
from qconvert import testing
from qconvert.calibration import calibrate_tensors, tensors_to_calibrate
from qconvert.dataset import DirectorySource, input_specs
from qconvert.passes import InsertQDQPass, prepare
from qconvert.passes.bias_correct import correctable_nodes
from qconvert.pipelines.held_out import HeldOut
from qconvert.pipelines.raise_costs import node_work, raise_cost
from qconvert.pipelines.recipe_samples import HELD_OUT, MAX_HELD_OUT, held_out_count
from qconvert.pipelines.weight_passes import correct_biases_of
from qconvert.plan import make_plan
from qconvert.recipe_fidelity import Fidelity, verdict_detail
from qconvert.schemes import SCHEMES


def _dequantized(w: np.ndarray) -> np.ndarray:
    """Symmetric int8 per output channel, by hand: scale max|w| / 127, round half to even."""
    scale = (np.abs(w).reshape(w.shape[0], -1).max(axis=1) / 127.0).astype(np.float32)
    scale = scale.reshape(-1, *([1] * (w.ndim - 1)))
    q = np.clip(np.rint(w.astype(np.float32) / scale), -127, 127)
    return (q * scale).astype(np.float32)


def _run(model: bytes | onnx.ModelProto, feeds):
    data = model if isinstance(model, bytes) else model.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_a_raised_node_computes_in_float_from_int8_stored_weights(tmp_path):
    rng = np.random.default_rng(0)
    w1 = (0.2 * rng.standard_normal((16, 8, 3, 3))).astype(np.float32)
    b1 = (0.1 * rng.standard_normal(16)).astype(np.float32)
    w2 = (0.2 * rng.standard_normal((8, 16, 3, 3))).astype(np.float32)
    model = testing.conv_relu_conv(w1, b1, w2)
    testing.write_samples(
        tmp_path / "calib", [testing.random_inputs(model, seed=i) for i in range(8)]
    )
    loaded = model_io.load_model(testing.save(model, tmp_path / "model.onnx"))
    prepared = prepare(loaded, min_opset=SCHEMES["int8"].min_opset)
    source = DirectorySource(tmp_path / "calib", input_specs(loaded))
    ranges = calibrate_tensors(prepared, source, tensors_to_calibrate(prepared))

    base = make_plan(prepared, SCHEMES["int8"], ranges)
    plan = make_plan(prepared, SCHEMES["int8"], ranges, raised=frozenset({"second"}))
    decisions = {node.name: node for node in plan.nodes}
    assert {name for name, d in decisions.items() if d.quantized} == set()
    assert decisions["second"].reason.startswith("raised by the recipe: computes in float")
    assert decisions["second"].reason.endswith("from int8-stored weights")
    # The float reader makes the Conv that writes its input float too, weights int8.
    assert decisions["first"].reason.endswith("from int8-stored weights")

    written = model_io.to_bytes(InsertQDQPass(plan=plan)(prepared.clone()).model)
    proto = onnx.load_model_from_string(written)
    int8 = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert sorted(int(np.prod(t.dims)) for t in int8) == sorted([w1.size, w2.size])
    assert len(written) < 0.35 * len(model.SerializeToString())
    # The output is the float model's arithmetic on the dequantized weights.
    reference = testing.conv_relu_conv(_dequantized(w1), b1, _dequantized(w2))
    for seed in range(3):
        feeds = testing.random_inputs(model, seed=100 + seed)
        expected = _run(reference, feeds)
        np.testing.assert_allclose(_run(written, feeds), expected, rtol=1e-5, atol=1e-5)
        assert np.abs(_run(model, feeds) - expected).max() > 1e-4  # the weights did round

    # Its cost counts the producer the plan made float with it.
    work = node_work(prepared, testing.random_inputs(model, seed=0))
    cost = raise_cost(base, plan, work)
    assert {"first", "second"} <= set(cost.made_float)
    assert cost.work_share > 0.99


def test_a_raised_matmul_before_the_output_reads_its_input_dequantized(tmp_path):
    # A float MatMul whose output no quantized op reads is not requantized by onnxruntime:
    # it reads the DequantizeLinear, and the MatMul before it keeps its integer kernel.
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        mlp (float[N,16] input) => (float[N,8] output) {
            h = MatMul (input, w1)
            r = Relu (h)
            output = MatMul (r, w2)
        }
    """)
    rng = np.random.default_rng(0)
    for name, shape in (("w1", (16, 16)), ("w2", (16, 8))):
        w = (0.3 * rng.standard_normal(shape)).astype(np.float32)
        model.graph.initializer.append(onnx.numpy_helper.from_array(w, name))
    model.graph.node[0].name, model.graph.node[2].name = "m1", "m2"
    samples = [testing.random_inputs(model, seed=i) for i in range(8)]
    testing.write_samples(tmp_path / "calib", samples)
    loaded = model_io.load_model(testing.save(model, tmp_path / "model.onnx"))
    prepared = prepare(loaded, min_opset=SCHEMES["int8"].min_opset)
    source = DirectorySource(tmp_path / "calib", input_specs(loaded))
    ranges = calibrate_tensors(prepared, source, tensors_to_calibrate(prepared))
    plan = make_plan(prepared, SCHEMES["int8"], ranges, raised=frozenset({"m2"}))
    decisions = {node.name: node for node in plan.nodes}
    assert decisions["m1"].quantized, decisions["m1"].reason
    assert not decisions["m2"].quantized and "m2" not in plan.float_readers
    assert decisions["m2"].reason.endswith("from int8-stored weights")


def _dynamic_conv() -> onnx.ModelProto:
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        dyn (float[N,4,H,W] input) => (float[N,6,H,W] output) {
            h = Conv <pads = [1,1,1,1]> (input, w)
            output = Relu (h)
        }
    """)
    w = np.random.default_rng(0).standard_normal((6, 4, 3, 3)).astype(np.float32)
    model.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    model.graph.node[0].name, model.graph.node[1].name = "conv", "relu"
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_node_of_dynamic_shape_is_costed_from_the_samples_shapes():
    model = prepare(ir.serde.deserialize_model(_dynamic_conv()), min_opset=13)
    shape = model.graph.node(0).outputs[0].shape
    assert shape is not None and not all(isinstance(d, int) for d in shape), shape
    feeds = {"input": np.zeros((2, 4, 10, 12), np.float32)}
    work = node_work(model, feeds)
    # Output elements x the multiply-accumulates of one: 2*6*10*12 x 4*3*3.
    assert work["conv"] == 2 * 6 * 10 * 12 * 4 * 3 * 3
    assert work["relu"] == 2 * 6 * 10 * 12
    # Without a sample, the static shapes tell nothing.
    assert node_work(model, None) == {"conv": 0.0, "relu": 0.0}


def test_a_node_whose_shape_depends_on_the_data_is_costed_from_a_run():
    # The Conv's input is reshaped by a shape given at run time: shape inference cannot
    # tell its size (an STFT front end computes its padding from the input's length).
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        framed (float[N] input, int64[3] frames) => (float[1,6,L] output) {
            x = Reshape (input, frames)
            output = Conv <pads = [1,1]> (x, w)
        }
    """)
    w = np.random.default_rng(0).standard_normal((6, 4, 3)).astype(np.float32)
    model.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    model.graph.node[1].name = "conv"
    prepared = prepare(ir.serde.deserialize_model(model), min_opset=13)
    feeds = {
        "input": np.zeros(4 * 50, np.float32),
        "frames": np.array([1, 4, 50], np.int64),
    }
    assert node_work(prepared, feeds)["conv"] == 6 * 50 * 4 * 3


def test_a_raise_on_int8_stored_weights_costs_no_file_bytes(tmp_path):
    # The stem's input has an outlier feature: its error is in the activation, so a raise
    # on int8-stored weights recovers it and the file stays as small as the single pass.
    path, _, report = quantize_outlier_stem(tmp_path)
    recipe = report.conversion.recipe
    stem = next(node for node in recipe.raised if node.name == "stem")
    assert stem.weight_share == 0.0 and stem.work_share > 0.0
    assert recipe.final.sqnr_db > recipe.start.sqnr_db + 15.0, recipe
    assert any(
        "stem (Gemm): float compute, int8-stored weights" in note and "no file bytes" in note
        for note in report.conversion.notes
    ), report.conversion.notes
    fast = qconvert.quantize(
        path, tmp_path / "fast.onnx", data=tmp_path / "calib", recipe="fast"
    )
    written = (tmp_path / "q.onnx").stat().st_size
    assert written < 1.05 * (tmp_path / "fast.onnx").stat().st_size
    assert fast.conversion.recipe is None


def _fidelity(sqnr, agreeing, rows=16):
    return Fidelity(sqnr_db=sqnr, top1_agreement=agreeing / rows, top1_rows=rows)


def test_one_flipped_sample_does_not_veto_a_step_that_sqnr_favours():
    before = _fidelity(20.0, 14)
    assert _fidelity(21.0, 13).improves(before)  # +1 dB, one of 16 flipped: kept
    assert not _fidelity(21.0, 12).improves(before)  # two flipped: dropped
    assert not _fidelity(20.05, 14).improves(before)  # too little SQNR
    assert _fidelity(20.5, 15).improves(before)
    # On 64 rows, one row is 1.6 points: a drop of 2 of 64 still vetoes.
    assert _fidelity(21.0, 55, 64).improves(_fidelity(20.0, 56, 64))
    assert not _fidelity(21.0, 54, 64).improves(_fidelity(20.0, 56, 64))


def test_below_the_top1_floor_one_flipped_sample_vetoes():
    before = _fidelity(20.0, 14)
    assert not _fidelity(21.0, 13).improves(before, top1_floor=0.97)
    assert _fidelity(21.0, 14).improves(before, top1_floor=0.97)  # no row lost
    # At or above the floor the one-row slack stays: 64 of 64 -> 63 of 64 (98.4%).
    assert _fidelity(21.0, 63, 64).improves(_fidelity(20.0, 64, 64), top1_floor=0.97)
    assert not _fidelity(21.0, 61, 64).improves(_fidelity(20.0, 62, 64), top1_floor=0.97)
    detail = verdict_detail(_fidelity(21.0, 13), before, top1_floor=0.97)
    assert detail == "top-1 down 1 of 16 rows, below the 97% floor"


def test_the_held_out_score_counts_its_rows(tmp_path):
    rng = np.random.default_rng(0)
    model = testing.gemm_bias(rng.standard_normal((10, 8)), np.zeros(10))
    samples = [{"input": rng.standard_normal((2, 8)).astype(np.float32)} for _ in range(16)]
    scorer = HeldOut(model.SerializeToString(), samples)
    # A candidate that moves one class up by a lot on every row: agreement counted on
    # 32 rows (16 samples of a batch of 2).
    w = rng.standard_normal((10, 8))
    score = scorer.score(testing.gemm_bias(w, np.zeros(10)).SerializeToString())
    assert score.top1_rows == 32
    assert score.top1_agreement is not None and score.top1_agreement < 1.0


def test_larger_folders_hold_out_more_samples():
    assert held_out_count(48) == HELD_OUT == 16
    assert held_out_count(64) == 16
    assert held_out_count(128) == 32
    assert held_out_count(10_000) == MAX_HELD_OUT == 64


def test_a_raised_node_keeps_its_bias_correction(tmp_path):
    # A raised node computes in float, but from int8-rounded weights: the mean shift their
    # rounding makes is corrected as a quantized node's is. Inputs with a large mean make
    # that shift large next to the output's spread.
    rng = np.random.default_rng(3)
    model = testing.gemm_bias(0.3 * rng.standard_normal((8, 64)), np.zeros(8))
    samples = [
        {"input": (3.0 + rng.standard_normal((4, 64))).astype(np.float32)} for _ in range(8)
    ]
    testing.write_samples(tmp_path / "calib", samples)
    loaded = model_io.load_model(testing.save(model, tmp_path / "model.onnx"))
    prepared = prepare(loaded, min_opset=SCHEMES["int8"].min_opset)
    source = DirectorySource(tmp_path / "calib", input_specs(loaded))
    ranges = calibrate_tensors(prepared, source, tensors_to_calibrate(prepared))
    plan = make_plan(prepared, SCHEMES["int8"], ranges, raised=frozenset({"gemm"}))
    assert not any(node.quantized for node in plan.nodes)
    assert [node.name for node in correctable_nodes(prepared, plan)] == ["gemm"]

    def mean_error(plan_model: ir.Model) -> np.ndarray:
        written = model_io.to_bytes(InsertQDQPass(plan=plan)(plan_model).model)
        errors = [_run(written, s) - _run(model, s) for s in samples]
        return np.abs(np.mean(errors, axis=(0, 1)))  # per output

    before = mean_error(prepared.clone())
    corrected = prepared.clone()
    correct_biases_of(corrected, plan, source, {})
    after = mean_error(corrected)
    assert before.max() > 1e-3  # the rounding did shift the mean
    assert after.max() < 0.1 * before.max(), (before, after)
