"""`python -m bench --quick` runs end to end on one tiny model built in code (no downloads),
so the bench code cannot rot; plus the bench's own readers (safetensors, WordPiece)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import ROOT


def test_quick_bench_writes_tables_with_measured_figures(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out), "--cache", str(cache)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["tiny_cnn"]
    assert not (cache / "files").exists()  # nothing fetched

    rows = {row["scheme"]: row for row in results["rows"]}
    int8 = rows["int8"]
    assert int8["status"] == "ok"
    for tool in ("ours", "theirs"):
        assert int8[f"{tool}_step"]["ok"]
        assert int8[f"{tool}_step"]["peak_mb"] > 10
        assert 0.0 < int8[f"{tool}_size_ratio"] < 1.0
        assert int8[f"{tool}_fidelity"]["sqnr_db"] > 20.0
        assert int8[f"{tool}_fidelity"]["agreement"] >= 0.8
        for key in ("latency_1t", "latency_all"):
            assert int8[key][tool] > 0.0
    assert int8["latency_1t_ours_over_theirs"] > 0.0
    other = int8["also_fidelity"]["other seed"]  # the second eval set, scored apart
    assert other["samples"] == 8
    for tool in ("ours", "theirs"):
        assert other[tool]["sqnr_db"] > 20.0
        assert other[tool]["sqnr_db"] != int8[f"{tool}_fidelity"]["sqnr_db"]
    for row in results["rows"]:  # a scheme qconvert lacks is a row, not a crash
        assert (
            row["status"] == "ok"
            or "not supported yet" in row["status"]
            or "no peer" in row["status"]
        )

    tools = {(r["tool"], r["samples"]) for r in results["scaling"] if r["ok"]}
    assert {("qconvert", 32), ("ort MinMax", 32), ("float pass", 32)} <= tools
    assert {("qconvert minmax", 32), ("qconvert percentile", 32)} <= tools
    assert {("qconvert quantize stage", 8), ("qconvert quantize stage", 32)} <= tools

    # Issue 10's section: the four configurations ran, and workers changed no statistic.
    section = results["parallel"]
    assert {run["config"] for run in section["runs"]} == {
        "1 worker, 1 thread",
        "2 workers, 1 thread each",
        "1 process, 2 onnxruntime threads",
        "1 process, 2 runs at once",
        "default (--workers auto)",
    }
    assert all(run["seconds"] > 0 for run in section["runs"])
    assert section["identical"]["2 workers, 1 thread each"] is True
    assert section["identical"]["default (--workers auto)"] is True
    assert section["merge_ms"] > 0 and section["per_sample_ms"] > 0
    assert [row["machines"] for row in section["estimate"]] == [1, 8, 64]

    text = (out / "results.md").read_text()
    assert "| tiny_cnn | int8 |" in text
    assert "## Parallel calibration" in text and "| 2 workers, 1 thread each |" in text
    assert "## Targets from the issues" in text
    assert "| tiny_cnn | int8 | other seed | 8 |" in text
    histogram_target = next(line for line in text.splitlines() if "on top of minmax" in line)
    assert "percentile" in histogram_target and "not measurable" not in histogram_target


def test_histogram_method_target_compares_each_method_with_minmax():
    from bench.targets import evaluate_targets

    def row(tool, samples, seconds):
        return {"model": "m", "samples": samples, "tool": tool, "ok": True, "seconds": seconds}

    scaling = [
        row("qconvert minmax", 64, 1.0),
        row("qconvert percentile", 64, 1.1),
        row("qconvert minmax", 256, 2.0),
        row("qconvert percentile", 256, 2.5),  # +25%: the worst count decides
        row("qconvert mse", 256, 2.2),
    ]
    targets = evaluate_targets({"rows": [], "scaling": scaling})
    (target,) = [t for t in targets if "on top of minmax" in t["target"]]
    assert target["measured"] == (
        "percentile +25% (at 256), mse +10% (at 256) (worst over sample counts)"
    )
    assert target["verdict"] == "NOT met"
    scaling[3] = row("qconvert percentile", 256, 2.3)
    targets = evaluate_targets({"rows": [], "scaling": scaling})
    (target,) = [t for t in targets if "on top of minmax" in t["target"]]
    assert target["verdict"] == "met"


def test_calibration_footprint_targets_read_each_tool_against_the_float_pass():
    from bench.targets import evaluate_targets

    X = "\u00d7"  # the multiplication sign the targets table writes

    def row(tool, samples, seconds, peak_mb):
        return {
            "model": "m",
            "samples": samples,
            "tool": tool,
            "ok": True,
            "seconds": seconds,
            "peak_mb": peak_mb,
        }

    scaling = [
        row("float pass", 64, 1.0, 100.0),
        row("qconvert", 64, 1.4, 150.0),
        row("qconvert quantize stage", 64, 1.6, 150.0),
        row("float pass", 1024, 10.0, 100.0),
        row("qconvert", 1024, 12.0, 160.0),  # +6.7% from 64: flat
        row("qconvert quantize stage", 1024, 14.0, 210.0),  # 2.1x, and +40%
    ]
    rows = [
        {
            "scheme": "int8",
            "model": "m",
            "group": "synthetic",
            "float_weight_bytes": 0,
            "ours_step": {"peak_mb": 300.0},
            "theirs_step": {"peak_mb": 400.0},
        },
    ]
    found = {
        t["target"]: t
        for t in evaluate_targets({"rows": rows, "scaling": scaling})
        if t["issue"] == "18"
    }
    assert found[f"calibrate wall time ≤ 1.5{X} one float pass (m)"]["measured"] == (
        f"1.40{X} at 64, 1.20{X} at 1024"
    )
    assert found[f"calibrate wall time ≤ 1.5{X} one float pass (m)"]["verdict"] == "met"
    memory = (
        f"peak RSS ≤ 2{X} one float pass's, flat (< 10% growth) from 64 to 1024 samples (m)"
    )
    assert found[f"calibrate {memory}"]["verdict"] == "met"
    assert found[f"calibrate {memory}"]["measured"] == (
        f"1.50{X} (150 MB) at 64, 1.60{X} (160 MB) at 1024; +6.7%"
    )
    stage = "quantize --data calibration"
    assert found[f"{stage} wall time ≤ 1.5{X} one float pass (m)"]["verdict"] == "NOT met"
    assert found[f"{stage} {memory}"]["verdict"] == "NOT met"
    peer = found["quantize --data peak RSS ≤ quantize_static's (m)"]
    assert (peer["measured"], peer["verdict"]) == ("300 MB vs 400 MB", "met")


def test_safetensors_reader_and_wordpiece(tmp_path):
    from bench.data import WordPieceTokenizer
    from bench.real import load_safetensors

    weight = np.arange(6, dtype=np.float32).reshape(2, 3)
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, "__metadata__": {}}
    ).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + weight.tobytes())
    np.testing.assert_array_equal(load_safetensors(path)["w"], weight)

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "quant", "##ize", "##r", ",", "é"]
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(vocab))
    tokenizer = WordPieceTokenizer(vocab_file)
    assert tokenizer.encode("The Quantizer, the xyz", 12)["input_ids"].tolist() == [
        [101, 4, 5, 6, 7, 8, 4, 1, 102, 0, 0, 0]  # [CLS] ... [UNK] [SEP] padding
    ]
    truncated = tokenizer.encode("The Quantizer, the xyz", 8)
    assert truncated["input_ids"].tolist() == [[101, 4, 5, 6, 7, 8, 4, 102]]
    assert truncated["attention_mask"].sum() == 8


def test_bench_on_a_user_model_scores_labels(tmp_path):
    sample = ROOT / "sample_models" / "digits_cnn"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--model", str(sample / "model.onnx"),
         "--data", str(sample / "calib"), "--eval", str(sample / "eval"),
         "--schemes", "int8", "--out", str(tmp_path), "--cache", str(tmp_path / "cache")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    (row,) = results["rows"]
    assert row["model"] == "digits_cnn" and row["status"] == "ok"
    assert row["float_accuracy"] > 0.9  # labels.npy was read
    assert abs(row["ours_fidelity"]["accuracy"] - row["float_accuracy"]) < 0.05
    assert results["scaling"] == []  # a user model gets no scaling study


def test_int4_data_target_reads_the_best_of_the_peers_rtn_gptq_and_hqq():
    from bench.targets import evaluate_targets

    def row(scheme: str, ours: float, theirs: float) -> dict:
        return {
            "model": "m",
            "group": "real",
            "scheme": scheme,
            "ours_step": {"ok": True},
            "ours_fidelity": {"agreement": ours, "agreement_kind": "cosine"},
            "theirs_fidelity": {"agreement": theirs, "agreement_kind": "cosine"},
        }

    rows = [
        row("int4", 0.960, 0.959),
        row("int4+data", 0.974, 0.959),
        row("int4+data-gptq", 0.974, 0.940),
        row("int4-hqq", 0.960, 0.976),
    ]
    (target,) = [
        t
        for t in evaluate_targets({"rows": rows, "scaling": []})
        if "peer's best int4" in t["target"]
    ]
    assert target["measured"].split(" vs ")[1].startswith("HQQ cosine 0.9760")
    assert target["verdict"] == "NOT met"
    rows[-1] = row("int4-hqq", 0.960, 0.970)
    (target,) = [
        t
        for t in evaluate_targets({"rows": rows, "scaling": []})
        if "peer's best int4" in t["target"]
    ]
    assert target["measured"].split(" vs ")[1].startswith("HQQ cosine 0.9700")
    assert target["verdict"] == "met"


def test_the_bench_writes_qconvert_bytecode_before_timing_anything():
    import importlib.util

    from bench.__main__ import compile_sources

    cached = importlib.util.cache_from_source(str(ROOT / "qconvert" / "grid_rounding.py"))
    Path(cached).unlink(missing_ok=True)
    compile_sources()
    assert Path(cached).is_file()
