"""Small layers on a vector that exists in float compute in float (`plan.vectors`).

A squeeze-excitation gate after a float HardSwish reads the pooled feature in float. As
int8 it would be an island (QuantizeLinear, NHWC integer kernels between Transposes, an
integer Mul behind another QuantizeLinear) around Convs of C_in x C_out
multiply-accumulates; in float it is two Convs onnxruntime fuses with their activations.
"""

from __future__ import annotations

import numpy as np

from qconvert import testing
from qconvert.plan.vectors import VECTOR_MAX_WEIGHTS

VECTOR = "reads a vector (no spatial extent) that exists in float"


def _samples(count: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [
        {"input": rng.standard_normal((1, 16, 12, 24)).astype(np.float32)}
        for _ in range(count)
    ]


def test_a_gate_on_a_float_pooled_feature_computes_in_float(tmp_path):
    samples = _samples()
    model = testing.squeeze_excitation(32, activation="HardSwish")
    path, out, floats, _ = testing.quantize_fast(model, tmp_path, "se", samples)
    for name in ("squeeze", "excite"):
        assert VECTOR in floats[name] and "int8-stored weights" in floats[name], floats
    # The Mul reads two float tensors: no integer Mul, no Q of the gate.
    assert "no quantized input flows into it" in floats["scale"], floats
    optimized = testing.optimized_ops(out, tmp_path)
    assert optimized["QLinearMul"] == 0 and optimized["QLinearConv"] == 1, optimized
    assert testing.output_sqnr(path, out, samples[:8]) > 30.0


def test_the_float_gate_runs_fewer_nodes_than_the_int8_island(tmp_path):
    """The same gate forced int8 by an override file: more nodes at run time."""
    samples = _samples()
    model = testing.squeeze_excitation(32, activation="HardSwish")
    _, out, floats, _ = testing.quantize_fast(model, tmp_path, "float_gate", samples)
    _, island, forced, _ = testing.quantize_fast(
        model,
        tmp_path,
        "int8_gate",
        samples,
        overrides='[nodes]\n"squeeze" = "int8"\n"excite" = "int8"\n',
    )
    assert "squeeze" in floats and "squeeze" not in forced, forced
    float_run = testing.optimized_ops(out, tmp_path)
    island_run = testing.optimized_ops(island, tmp_path)
    assert island_run["QLinearConv"] == 3 and island_run["QLinearMul"] == 1, island_run
    # The island's QuantizeLinear of the vector and its layout changes are what it adds.
    assert island_run["Transpose"] > float_run["Transpose"], (island_run, float_run)
    assert island_run["QuantizeLinear"] > float_run["QuantizeLinear"], (island_run, float_run)
    assert float_run["QLinearMul"] == 0, float_run


def test_a_gate_on_a_quantized_pooled_feature_stays_int8(tmp_path):
    """After a Relu folded into a quantized Conv, the pooled vector is written as uint8."""
    samples = _samples()
    model = testing.squeeze_excitation(32, activation="Relu")
    _, out, floats, report = testing.quantize_fast(model, tmp_path, "relu", samples)
    assert "squeeze" not in floats and "excite" not in floats, floats
    assert {"squeeze", "excite"} <= {
        node.name for node in report.conversion.nodes if node.precision == "int8"
    }
    # No island here: the gate's Convs join the integer chain (the first Conv's too; the
    # last one writes the graph output).
    optimized = testing.optimized_ops(out, tmp_path)
    assert optimized["QLinearConv"] == 3 and optimized["QLinearMul"] == 1, optimized


def test_a_large_layer_on_a_float_vector_stays_int8(tmp_path):
    """Past VECTOR_MAX_WEIGHTS multiply-accumulates, the integer kernel's saving counts."""
    samples = _samples()
    channels = 384
    assert channels * channels // 2 > VECTOR_MAX_WEIGHTS
    # Sigmoid: calibration fails on a Conv of 64 KB or more read by the Mul of a
    # HardSigmoid (onnxruntime fuses the Mul into weights handed to it as arrays).
    model = testing.squeeze_excitation(channels, gate="Sigmoid", squeeze=2)
    _, _, floats, _ = testing.quantize_fast(model, tmp_path, "large", samples)
    assert "squeeze" not in floats and "excite" not in floats, floats


THIN = "thin Conv between float ops"


def _thin_samples(count: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    return [
        {"input": rng.standard_normal((1, 8, 24, 48)).astype(np.float32)} for _ in range(count)
    ]


def test_a_run_of_thin_convs_before_a_gate_computes_in_float(tmp_path):
    """The int8 boundary moves past the thin Convs and the gate, to the first wide Conv."""
    samples = _thin_samples()
    model = testing.thin_chain(gate=True)
    path, out, floats, report = testing.quantize_fast(model, tmp_path, "gate", samples)
    for name in ("pointwise", "depthwise"):
        assert THIN in floats[name] and "int8-stored weights" in floats[name], floats
    assert "no quantized input flows into it" in floats["scale"], floats
    assert "widen" in {n.name for n in report.conversion.nodes if n.precision == "int8"}
    optimized = testing.optimized_ops(out, tmp_path)
    # One QuantizeLinear, of the gated tensor, where the integer chain starts.
    assert optimized["QLinearMul"] == 0 and optimized["QuantizeLinear"] == 1, optimized
    assert testing.output_sqnr(path, out, samples[:4]) > 30.0


def test_a_run_of_thin_convs_into_a_wide_conv_stays_int8(tmp_path):
    """Without the gate the thin Convs feed the integer chain: their int8 kernels stay."""
    samples = _thin_samples()
    model = testing.thin_chain(gate=False)
    _, _, floats, _ = testing.quantize_fast(model, tmp_path, "chain", samples)
    assert "pointwise" not in floats and "depthwise" not in floats, floats
