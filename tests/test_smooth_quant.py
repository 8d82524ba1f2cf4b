"""--smooth-quant on a LayerNormalization -> MatMul graph with one outlier channel."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import qconvert
from qconvert import testing
from qconvert.passes.smooth import channel_absmax, smooth, smooth_sites
from qconvert.runtime import make_session

K = 16


def _model():
    rng = np.random.default_rng(0)
    gamma = np.ones(K)
    gamma[3] = 60.0  # one outlier channel, as transformer LayerNorms have
    beta = 0.1 * rng.standard_normal(K)
    w = 0.3 * rng.standard_normal((K, 8))
    w2 = 0.3 * rng.standard_normal((K, 8))
    w[3] *= 1 / 60.0  # the outlier channel matters no more than the others at the output
    w2[3] *= 1 / 60.0
    return testing.layernorm_matmul(gamma, beta, w, w2)


def _samples(count=16):
    rng = np.random.default_rng(1)
    return [{"input": rng.standard_normal((1, 4, K)).astype(np.float32)} for _ in range(count)]


def test_smoothing_balances_channels_and_keeps_the_function():
    model = _model()
    samples = _samples()
    reference = make_session(model.SerializeToString())
    ir_model = ir.from_proto(model)
    sites = smooth_sites(ir_model)
    assert [len(site.readers) for site in sites] == [2]
    name = sites[0].tensor
    exposed = ir.to_proto(ir_model)
    exposed.graph.output.add().name = name
    runs = [
        {name: make_session(exposed.SerializeToString()).run([name], s)[0]} for s in samples
    ]
    before = channel_absmax(runs, [name])[name]
    assert smooth(sites, {name: before}, alpha=0.5) == 1
    smoothed = ir.to_proto(ir_model)
    after_session = make_session(smoothed.SerializeToString())
    for feeds in samples:
        np.testing.assert_allclose(
            after_session.run(None, feeds)[0],
            reference.run(None, feeds)[0],
            rtol=1e-4,
            atol=1e-5,
        )
    exposed = ir.to_proto(ir_model)
    exposed.graph.output.add().name = name
    after = np.max(
        [
            np.abs(make_session(exposed.SerializeToString()).run([name], s)[0])
            .reshape(-1, K)
            .max(axis=0)
            for s in samples
        ],
        axis=0,
    )
    # The outlier channel was 60 times the median; smoothing brings it near the others.
    assert before.max() / np.median(before) > 30
    assert after.max() / np.median(after) < 0.3 * before.max() / np.median(before)


def test_smooth_quant_flag_raises_int8_fidelity(tmp_path):
    model = _model()
    path = testing.save(model, tmp_path / "model.onnx")
    samples = _samples(32)
    testing.write_samples(tmp_path / "calib", samples)
    sqnr = {}
    for alpha in (None, 0.5):
        out = tmp_path / f"q{alpha}.onnx"
        report = qconvert.quantize(
            path,
            out,
            data=tmp_path / "calib",
            config=qconvert.QuantizeConfig(smooth_quant=alpha),
        )
        sqnr[alpha] = testing.output_sqnr(path, out, samples)
    assert any("SmoothQuant (alpha 0.5): 1 " in n for n in report.conversion.notes)
    assert sqnr[0.5] > sqnr[None] + 6.0


def test_a_transformer_without_data_is_pointed_to_int8_dynamic(run_cli, tmp_path):
    path = testing.save(_model(), tmp_path / "model.onnx")
    out = tmp_path / "q.onnx"
    result = run_cli("quantize", path, "-o", out)
    assert result.code == 2, result.err
    assert "--scheme int8-dynamic" in result.err
    assert "transformer" in result.err
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--smooth-quant", "0.5", "--scheme", "int8-dynamic"), "--smooth-quant does not go"),
        (("--smooth-quant", "1.5"), "Invalid value for '--smooth-quant'"),
    ],
)
def test_bad_smooth_quant_options(run_cli, tmp_path, args, fragment):
    path = testing.save(_model(), tmp_path / "model.onnx")
    testing.write_samples(tmp_path / "calib", _samples(4))
    out = tmp_path / "q.onnx"
    result = run_cli("quantize", path, "--data", tmp_path / "calib", "-o", out, *args)
    assert result.code == 2, result.err
    assert fragment in result.err
    assert not out.exists()
