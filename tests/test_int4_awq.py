"""AWQ-class input scaling for int4 (`qconvert.awq`), on layers built here with outlier
input channels."""

from __future__ import annotations

import numpy as np
import onnx

import qconvert
from qconvert import testing
from qconvert.awq import choose_scale
from qconvert.config import QuantizeConfig
from qconvert.gptq import gram

OUTLIERS = (3, 17, 40, 41)


def _inputs(rng: np.random.Generator, count: int, k: int = 64) -> list[np.ndarray]:
    """[1, 4, k] activations whose OUTLIERS channels run 25 times larger (as after a
    LayerNorm in a transformer)."""
    gain = np.ones(k, np.float32)
    gain[list(OUTLIERS)] = 25.0
    return [(rng.normal(size=(1, 4, k)) * gain).astype(np.float32) for _ in range(count)]


def test_input_scaling_lowers_held_out_output_error_against_round_to_nearest():
    rng = np.random.default_rng(0)
    w = (rng.normal(size=(64, 32)) * 0.2).astype(np.float32)
    fit = sum(gram(x, 64) for x in _inputs(rng, 24))
    held = sum(gram(x, 64) for x in _inputs(rng, 8))
    choice = choose_scale(w, fit, held, block_size=32, symmetric=True)
    assert choice.scales is not None and choice.alpha > 0
    # outlier channels get the largest scales: their rows round on finer steps
    assert set(np.argsort(choice.scales)[-len(OUTLIERS) :]) == set(OUTLIERS)
    assert choice.error < 0.8 * choice.base_error, (choice.error, choice.base_error)
    # on the int8 kernel's grid too
    choice = choose_scale(w, fit, held, block_size=32, symmetric=True, int8_grid=True)
    assert choice.scales is not None and choice.error < choice.base_error


def test_input_scaling_is_left_out_where_it_does_not_help():
    rng = np.random.default_rng(1)
    w = (rng.normal(size=(64, 32)) * 0.2).astype(np.float32)
    flat = [rng.normal(size=(1, 4, 64)).astype(np.float32) for _ in range(32)]
    fit = sum(gram(x, 64) for x in flat[:24])
    held = sum(gram(x, 64) for x in flat[24:])
    choice = choose_scale(w, fit, held, block_size=32, symmetric=True)
    if choice.scales is None:
        assert choice.error == choice.base_error
    else:  # kept only on a lower held-out error
        assert choice.error < choice.base_error


def test_int8_kernel_with_data_divides_the_input_of_a_scaled_layer(tmp_path):
    float_model = testing.matmul_add(k=64, n=32)
    path = testing.save(float_model, tmp_path / "model.onnx")
    rng = np.random.default_rng(2)
    data = testing.write_samples(tmp_path / "data", [{"input": x} for x in _inputs(rng, 16)])
    evaluation = [{"input": x} for x in _inputs(rng, 8)]
    out = tmp_path / "with_data.onnx"
    config = QuantizeConfig(scheme="int4", int4_kernel="int8")
    report = qconvert.quantize(path, out, data=data, config=config)
    note = next(n for n in report.conversion.notes if "input scaling" in n)
    assert "kept on 1 of them" in note
    assert testing.optimized_ops(out, tmp_path) == {
        "Mul": 1,  # x / s
        "DynamicQuantizeMatMul": 1,
        "Add": 1,
    }
    plain = tmp_path / "rtn.onnx"
    qconvert.quantize(path, plain, config=config)
    scaled_sqnr = testing.output_sqnr(float_model, out, evaluation)
    rtn_sqnr = testing.output_sqnr(float_model, plain, evaluation)
    assert scaled_sqnr > rtn_sqnr + 1.0, (scaled_sqnr, rtn_sqnr)
    # MatMulNBits does not search it (see pipelines.int4): no Mul, no note
    report = qconvert.quantize(
        path,
        tmp_path / "nbits.onnx",
        data=data,
        config=QuantizeConfig(scheme="int4", int4_kernel="nbits"),
    )
    assert "Mul" not in testing.count_ops(onnx.load(tmp_path / "nbits.onnx"))
