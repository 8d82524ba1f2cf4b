"""A one-channel strided Conv1d (an STFT front end) runs as a MatMul over frames.

Preparation rewrites it (`passes/frames.py`), exactly in float; quantized, the MatMul
writes its spectrum in float (MatMulIntegerToFloat), as no quantized op reads it before the
magnitude (`ActivationRules._writes_float`, looking through the Transpose and Slices).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qconvert import testing
from qconvert.passes.prepare import prepare
from qconvert.runtime import make_session


def _run(model, samples):
    session = make_session(model.SerializeToString())
    return [session.run(None, sample)[0] for sample in samples]


def _prepared(model):
    return ir.to_proto(prepare(ir.from_proto(model), min_opset=13))


def _quantized_in_runtime(path, folder) -> set[str]:
    """The float tensors onnxruntime quantizes, after its fusions."""
    optimized = testing.optimized_model(path, folder)
    return {n.input[0] for n in optimized.graph.node if n.op_type == "QuantizeLinear"}


def _one_channel_convs(model) -> int:
    weights = {t.name: t.dims for t in model.graph.initializer}
    return sum(
        1
        for node in model.graph.node
        if node.op_type == "Conv" and weights[node.input[1]][1] == 1
    )


@pytest.mark.parametrize(
    ("length", "hop", "kernel", "bias"),
    [
        (152, 16, 32, False),  # 9.5 hops: the last half hop is read by no frame
        (None, 16, 32, True),  # length known only when it runs
        (160, 16, 16, False),  # one hop per frame: no Concat
        (None, 8, 32, False),  # four hops per frame
    ],
)
def test_prepare_computes_the_conv_as_a_matmul_over_frames(length, hop, kernel, bias):
    model = testing.stft_front_end(length=length, hop=hop, kernel=kernel, bias=bias)
    prepared = _prepared(model)
    assert _one_channel_convs(model) == 1 and _one_channel_convs(prepared) == 0
    assert [n.op_type for n in prepared.graph.node].count("MatMul") == 1
    for run_length in [length] if length else [152, 160, 171]:
        samples = testing.tones(2, length=run_length, seed=3)
        for want, got in zip(_run(model, samples), _run(prepared, samples), strict=True):
            assert want.shape == got.shape
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_length_constants_decide_is_cut_without_shape_ops():
    # The reflect padding's amounts come from a Concat and a Cast of constants, which
    # shape inference leaves unevaluated; preparation evaluates them, so no Shape op cuts
    # the frames at run time.
    model = testing.stft_front_end(length=152, reflect=16)
    prepared = _prepared(model)
    ops_run = [n.op_type for n in prepared.graph.node]
    assert "MatMul" in ops_run and "Shape" not in ops_run
    samples = testing.tones(2, length=152, seed=4)
    for want, got in zip(_run(model, samples), _run(prepared, samples), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("what", "options"),
    [("padded", {"pads": 2}), ("kernel not whole hops", {"kernel": 24})],
)
def test_a_conv_whose_frames_are_not_plain_slices_stays(what, options):
    model = testing.stft_front_end(**options)
    assert _one_channel_convs(_prepared(model)) == 1, what


def test_the_quantized_spectrum_is_written_in_float_on_an_integer_kernel(tmp_path):
    model = testing.stft_front_end(length=None)
    calib, held_out = testing.tones(16, seed=0), testing.tones(16, seed=1)
    path, out, _, _ = testing.quantize_fast(model, tmp_path, "frames", calib)
    runs = testing.optimized_ops(out, tmp_path)
    assert runs["MatMulIntegerToFloat"] == 1
    assert runs["MatMul"] == 0 and runs["QLinearMatMul"] == 0 and runs["Conv"] == 0
    # The signal is quantized before it is cut into frames (`plan/moves.py`): the frames
    # are copied as uint8, the Concat copies integers on one grid.
    assert "signal" in _quantized_in_runtime(out, tmp_path)
    assert runs["QLinearConcat"] == 1 and runs["Concat"] == 0
    # The same plan with the spectrum forced onto one uint8 grid (an override): its quiet
    # high bins get a handful of levels.
    _, forced, _, _ = testing.quantize_fast(
        model,
        tmp_path,
        "forced",
        calib,
        overrides='[tensors]\n"stft_matmul" = "uint8"\n',
    )
    assert testing.optimized_ops(forced, tmp_path)["QLinearMatMul"] == 1
    sqnr = testing.output_sqnr(path, out, held_out)
    forced_sqnr = testing.output_sqnr(path, forced, held_out)
    assert sqnr > forced_sqnr + 2.5, (sqnr, forced_sqnr)


def test_the_signal_is_quantized_after_the_last_copy_a_float_op_reads(tmp_path):
    # A float op reads the blocks too: they stay float for it (exactly), and the
    # QuantizeLinear moves up to them, not to the signal.
    model = testing.stft_front_end(length=152)
    prepared = _prepared(model)
    blocks = next(n.output[0] for n in prepared.graph.node if n.op_type == "Reshape")
    prepared.graph.node.append(onnx.helper.make_node("Neg", [blocks], ["blocks_neg"]))
    prepared.graph.output.append(
        onnx.helper.make_tensor_value_info("blocks_neg", onnx.TensorProto.FLOAT, ["N", 9, 16])
    )
    path, out, _, _ = testing.quantize_fast(prepared, tmp_path, "read", testing.tones(8))
    quantized = _quantized_in_runtime(out, tmp_path)
    assert blocks in quantized and "signal" not in quantized
    assert testing.optimized_ops(out, tmp_path)["QLinearConcat"] == 1
    samples = testing.tones(2, seed=5)
    reference, candidate = (make_session(str(p)) for p in (path, out))
    for sample in samples:
        want = reference.run(["blocks_neg"], sample)[0]
        np.testing.assert_array_equal(candidate.run(["blocks_neg"], sample)[0], want)
