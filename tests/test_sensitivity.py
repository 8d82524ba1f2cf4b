"""analyze and mixed precision on a tiny graph with one node made sensitive by construction."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import qconvert
from qconvert import testing
from qconvert.runtime import make_session


@pytest.fixture
def sensitive(tmp_path):
    model = testing.sensitive_mlp()
    path = testing.save(model, tmp_path / "model.onnx")
    samples = [testing.random_inputs(model, seed=i) for i in range(32)]
    testing.write_samples(tmp_path / "calib", samples)
    return path, samples


def test_analyze_ranks_the_sensitive_node_first(sensitive, tmp_path):
    path, _ = sensitive
    analysis = qconvert.api.analyze(path, data=tmp_path / "calib", samples=8)
    names = [node.name for node in analysis.nodes]
    assert sorted(names) == ["g1", "g2", "g3"]
    assert names[0] == "g2"
    first, second = analysis.nodes[0], analysis.nodes[1]
    assert first.sqnr_db < 15.0 < 25.0 < second.sqnr_db
    assert analysis.full_sqnr_db < 15.0
    assert analysis.samples == 8


def test_analyze_cli_prints_the_ranking_as_json(run_cli, sensitive, tmp_path):
    path, _ = sensitive
    result = run_cli("analyze", path, "--data", tmp_path / "calib", "--json")
    assert result.code == 0, result.err
    document = json.loads(result.out)
    assert document["nodes"][0]["name"] == "g2"
    assert document["samples"] == 16


def test_target_sqnr_keeps_exactly_the_sensitive_node_float(run_cli, sensitive, tmp_path):
    path, samples = sensitive
    out, report = tmp_path / "mixed.onnx", tmp_path / "mixed.json"
    result = run_cli(
        "quantize",
        path,
        "--data",
        tmp_path / "calib",
        "-o",
        out,
        "--target-sqnr",
        "25",
        "--report",
        report,
    )
    assert result.code == 0, result.err
    conversion = json.loads(report.read_text())["conversion"]
    kept = [n for n in conversion["float_nodes"] if "mixed precision" in n["reason"]]
    assert [n["name"] for n in kept] == ["g2"]
    note = next(n for n in conversion["notes"] if n.startswith("Mixed precision"))
    assert "1 node(s) float (g2)" in note and "target reached" in note
    assert "bytes of float32 weights and latency:" in note
    # Measured with onnxruntime's optimizations on: g2 really runs on float weights.
    assert testing.output_sqnr(path, out, samples) >= 25.0
    fully = tmp_path / "full.onnx"
    assert run_cli("quantize", path, "--data", tmp_path / "calib", "-o", fully).code == 0
    assert testing.output_sqnr(path, fully, samples) < 15.0


def test_a_target_already_met_keeps_every_node_quantized(sensitive, tmp_path):
    path, _ = sensitive
    report = qconvert.quantize(
        path, tmp_path / "q.onnx", data=tmp_path / "calib", target_sqnr=0.0
    )
    assert not [n for n in report.conversion.float_nodes if n.op_type == "Gemm"]


def test_max_top1_drop_uses_eval_labels(sensitive, tmp_path):
    path, samples = sensitive
    session = make_session(str(path))
    eval_dir = testing.write_samples(tmp_path / "eval", samples)
    labels = [int(np.argmax(session.run(None, s)[0])) for s in samples]
    np.save(eval_dir / "labels.npy", np.array(labels))
    report = qconvert.quantize(
        path,
        tmp_path / "q.onnx",
        data=tmp_path / "calib",
        eval_data=eval_dir,
        max_top1_drop=0.0,
    )
    kept = [n.name for n in report.conversion.float_nodes if "mixed" in n.reason]
    assert "g2" in kept
    assert report.comparison.accuracy_drop_points <= 0.0


def test_a_float_gemm_beside_quantized_ones_reads_float_values(sensitive, tmp_path):
    # onnxruntime quantizes the weights of a float Gemm whose input is a DequantizeLinear;
    # the kept node must read a value no DequantizeLinear writes.
    path, _ = sensitive
    out = tmp_path / "excluded.onnx"
    qconvert.quantize(
        path, out, data=tmp_path / "calib", config=qconvert.QuantizeConfig(exclude=("g2",))
    )
    model = onnx.load(str(out))
    producers = {o: n for n in model.graph.node for o in n.output}
    g2 = next(n for n in model.graph.node if n.name == "g2")
    assert producers[g2.input[0]].op_type != "DequantizeLinear"
    assert g2.input[1] == "w2"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--max-top1-drop", "1"), "--max-top1-drop needs --eval DIR"),
        (("--target-sqnr", "30", "--scheme", "int8-dynamic"), "do not go with --scheme"),
        (("--target-sqnr", "30", "--format", "qop"), "do not go with --scheme"),
    ],
)
def test_bad_mixed_precision_options(run_cli, sensitive, tmp_path, args, fragment):
    path, _ = sensitive
    out = tmp_path / "bad.onnx"
    result = run_cli("quantize", path, "--data", tmp_path / "calib", "-o", out, *args)
    assert result.code == 2, result.err
    assert fragment in result.err
    assert "Traceback" not in result.err
    assert not out.exists()
