"""`qconvert compare` on tiny models: gates, options, renderings and every bad input."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest

import qconvert
from qconvert import testing
from qconvert.runtime import make_session

GATES = {
    "max-top1-drop": "accuracy_drop_points",
    "min-top1-agreement": "top1_agreement",
    "min-sqnr": "sqnr_db",
    "min-cosine": "cosine",
    "max-size-ratio": "size_ratio",
    "max-latency-ratio": "latency_ratio",
}


@pytest.fixture
def pair(tmp_path, tiny_cnn) -> tuple[Path, Path, Path]:
    """The float tiny CNN, its int8 version, and an eval folder of 24 samples with labels.

    The labels are the float model's predictions, except the first 3, which are wrong on
    purpose: the float model then scores 21/24.
    """
    model = onnx.load_model(str(tiny_cnn))
    evaluation = testing.write_samples(
        tmp_path / "eval", [testing.random_inputs(model, seed=100 + i) for i in range(24)]
    )
    session = make_session(str(tiny_cnn))
    predictions = [
        int(np.argmax(session.run(None, {"input": np.load(path)})[0]))
        for path in sorted(evaluation.glob("s*.npy"))
    ]
    labels = np.array(predictions, np.int64)
    labels[:3] = (labels[:3] + 1) % 10
    np.save(evaluation / "labels.npy", labels)
    candidate = tmp_path / "model.int8.onnx"
    qconvert.quantize(tiny_cnn, candidate, data=tmp_path / "calib")
    return tiny_cnn, candidate, evaluation


def _compare(run_cli, pair, *extra):
    reference, candidate, evaluation = pair
    return run_cli("compare", reference, candidate, "--data", evaluation, *extra)


def _json(run_cli, pair, *extra) -> dict:
    result = _compare(run_cli, pair, "--json", *extra)
    assert result.code == 0, result.err
    return json.loads(result.out)


def _assert_bad_input(result, *fragments, absent=()):
    assert result.code == 3, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("Error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.err
    for path in absent:
        assert not Path(path).exists()
        assert not [
            p for p in Path(path).parent.iterdir() if p.name.startswith(f".{path.name}.")
        ]


# --- the numbers --------------------------------------------------------------------------


def test_report_numbers_match_an_independent_computation(run_cli, pair):
    reference, candidate, evaluation = pair
    report = _json(run_cli, pair)
    assert report["schema_version"] == 1 and report["command"] == "compare"
    comparison = report["comparison"]
    assert comparison["samples"] == 24
    labels = np.load(evaluation / "labels.npy")
    sessions = [make_session(str(reference)), make_session(str(candidate))]
    signal = noise = 0.0
    hits = [0, 0]
    for index, path in enumerate(sorted(evaluation.glob("s*.npy"))):
        ref, cand = (
            s.run(None, {"input": np.load(path)})[0].astype(np.float64) for s in sessions
        )
        signal += float(np.sum(ref**2))
        noise += float(np.sum((ref - cand) ** 2))
        hits[0] += int(ref.argmax() == labels[index])
        hits[1] += int(cand.argmax() == labels[index])
    assert comparison["reference_accuracy"] == pytest.approx(21 / 24)
    assert comparison["candidate_accuracy"] == pytest.approx(hits[1] / 24)
    assert comparison["accuracy_drop_points"] == pytest.approx(100 * (hits[0] - hits[1]) / 24)
    (logits,) = comparison["outputs"]
    assert logits["name"] == "logits"
    assert logits["sqnr_db"] == pytest.approx(10 * math.log10(signal / noise), rel=1e-6)
    assert logits["relative_error"] == pytest.approx(math.sqrt(noise / signal), rel=1e-6)
    assert comparison["reference"]["bytes"] == reference.stat().st_size
    assert comparison["candidate"]["bytes"] == candidate.stat().st_size
    assert comparison["size_ratio"] == pytest.approx(
        candidate.stat().st_size / reference.stat().st_size
    )
    assert comparison["labels"] == str(evaluation / "labels.npy")
    assert report["gates"] == [] and report["passed"] is True


def test_a_model_against_itself_is_exact(run_cli, pair):
    reference, _, evaluation = pair
    result = run_cli("compare", reference, reference, "--data", evaluation, "--json")
    (logits,) = json.loads(result.out)["comparison"]["outputs"]
    assert logits["sqnr_db"] == "inf"
    assert logits["cosine"] == pytest.approx(1.0)
    assert logits["top1_agreement"] == 1.0 and logits["max_abs_error"] == 0.0


def test_labels_option_overrides_the_folder(run_cli, pair, tmp_path):
    _, _, evaluation = pair
    labels = np.load(evaluation / "labels.npy")
    np.save(tmp_path / "other.npy", (labels + 1) % 10)  # every float prediction now wrong
    report = _json(run_cli, pair, "--labels", tmp_path / "other.npy")
    assert report["comparison"]["reference_accuracy"] == 0.0


def test_terminal_table_shows_outputs_accuracy_and_sizes(run_cli, pair):
    result = _compare(run_cli, pair)
    assert result.code == 0, result.err
    for fragment in ("SQNR dB", "logits", "accuracy", "87.50%", "size", "top-5"):
        assert fragment in result.out


def test_json_prints_nothing_but_the_report(run_cli, pair):
    result = _compare(run_cli, pair, "--json")
    assert result.out.lstrip().startswith("{") and result.out.rstrip().endswith("}")
    json.loads(result.out)


def test_latency_reports_median_p90_and_ratio(run_cli, pair):
    report = _json(run_cli, pair, "--latency", "--runs", "7", "--threads", "1")
    comparison = report["comparison"]
    for side in ("reference", "candidate"):
        latency = comparison[side]["latency"]
        assert latency["runs"] == 7 and latency["threads"] == 1
        assert 0 < latency["median_ms"] <= latency["p90_ms"]
    assert comparison["latency_ratio"] == pytest.approx(
        comparison["candidate"]["latency"]["median_ms"]
        / comparison["reference"]["latency"]["median_ms"]
    )


def test_sizes_count_external_data(run_cli, pair, tmp_path):
    reference, _, evaluation = pair
    external = tmp_path / "external"
    external.mkdir()
    onnx.save_model(
        onnx.load_model(str(reference)),
        str(external / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    expected = (external / "model.onnx").stat().st_size + (
        external / "weights.bin"
    ).stat().st_size
    result = run_cli(
        "compare", reference, external / "model.onnx", "--data", evaluation, "--json"
    )
    comparison = json.loads(result.out)["comparison"]
    assert comparison["candidate"]["bytes"] == expected
    assert comparison["outputs"][0]["sqnr_db"] == "inf"


def test_provider_is_recorded_and_unknown_ones_refused(run_cli, pair):
    report = _json(run_cli, pair, "--provider", "cpu")
    assert report["comparison"]["candidate"]["provider"] == "CPUExecutionProvider"
    result = _compare(run_cli, pair, "--provider", "cpu", "--provider", "NoSuchProvider")
    assert result.code == 2
    assert "Execution provider 'NoSuchProvider' is not available" in result.err


# --- saved reference outputs --------------------------------------------------------------


def test_saved_outputs_replace_the_reference_model(run_cli, pair, tmp_path):
    reference, candidate, evaluation = pair
    saved = tmp_path / "reference_outputs.npz"
    first = _json(run_cli, pair, "--save-outputs", saved)
    with zipfile.ZipFile(saved) as archive:
        names = archive.namelist()
    assert "s00000/0.npy" in names and "s00023/0.npy" in names
    assert np.load(saved)["s00003/0"].shape == (1, 10)  # numpy reads it as an .npz
    result = run_cli(
        "compare", candidate, "--load-outputs", saved, "--data", evaluation, "--json"
    )
    assert result.code == 0, result.err
    second = json.loads(result.out)["comparison"]
    assert second["outputs"] == first["comparison"]["outputs"]
    assert second["accuracy_drop_points"] == first["comparison"]["accuracy_drop_points"]
    assert second["reference"]["bytes"] == reference.stat().st_size
    assert second["size_ratio"] == first["comparison"]["size_ratio"]


def test_saved_outputs_from_other_data_are_refused(run_cli, pair, tmp_path, tiny_cnn):
    _, candidate, _ = pair
    saved = tmp_path / "reference_outputs.npz"
    assert _compare(run_cli, pair, "--save-outputs", saved).code == 0
    result = run_cli(
        "compare", candidate, "--load-outputs", saved, "--data", tmp_path / "calib"
    )
    _assert_bad_input(result, "reference_outputs.npz", "was not made on this data")


def test_a_gate_that_cannot_be_measured_fails(run_cli, pair, tmp_path):
    _, candidate, evaluation = pair
    saved = tmp_path / "reference_outputs.npz"
    assert _compare(run_cli, pair, "--save-outputs", saved).code == 0
    # Saved outputs carry no reference latency, so the latency ratio is unknown.
    result = run_cli(
        "compare",
        candidate,
        "--load-outputs",
        saved,
        "--data",
        evaluation,
        "--max-latency-ratio",
        "1000",
        "--runs",
        "3",
    )
    assert result.code == 1
    assert result.err.strip() == (
        "Error: gate failed: max-latency-ratio: not measured, needs <= 1000"
    )


def test_load_outputs_takes_one_model(run_cli, pair, tmp_path):
    reference, candidate, evaluation = pair
    result = run_cli(
        "compare",
        reference,
        candidate,
        "--load-outputs",
        tmp_path / "x.npz",
        "--data",
        evaluation,
    )
    assert result.code == 2
    assert "expected CANDIDATE, got 2" in result.err


# --- gates --------------------------------------------------------------------------------


@pytest.fixture
def measured(run_cli, pair) -> dict[str, float]:
    """Each gate's measured value on `pair` (latency measured with few runs)."""
    comparison = _json(run_cli, pair, "--latency", "--runs", "3")["comparison"]
    output = comparison["outputs"][0]
    return {
        "max-top1-drop": comparison["accuracy_drop_points"],
        "min-top1-agreement": 100 * output["top1_agreement"],
        "min-sqnr": output["sqnr_db"],
        "min-cosine": output["cosine"],
        "max-size-ratio": comparison["size_ratio"],
        "max-latency-ratio": comparison["latency_ratio"],
    }


@pytest.mark.parametrize("gate", sorted(GATES))
def test_each_gate_passes_and_fails(run_cli, pair, measured, gate):
    value = measured[gate]
    if gate == "max-latency-ratio":  # latency varies: thresholds far from any real ratio
        lenient, strict = 1000.0, 1e-6
    elif gate == "max-size-ratio":
        lenient, strict = 2 * value, value / 2
    elif gate == "min-cosine":
        lenient, strict = value - 1e-3, 1.000001
    elif gate.startswith("min-"):
        lenient, strict = value - 1, value + 1
    else:
        lenient, strict = value + 1, value - 1
    passing = _compare(run_cli, pair, f"--{gate}", str(lenient), "--runs", "3")
    assert passing.code == 0, passing.err
    assert passing.err == ""
    failing = _compare(run_cli, pair, f"--{gate}", str(strict), "--runs", "3", "--json")
    assert failing.code == 1
    line = failing.err.strip()
    assert len(line.splitlines()) == 1
    assert line.startswith(f"Error: gate failed: {gate}: measured ")
    bound = ">=" if gate.startswith("min-") else "<="
    assert f"needs {bound} {strict:.4g}" in line
    report = json.loads(failing.out)
    (result,) = report["gates"]
    assert result["gate"] == gate and result["passed"] is False
    assert result["threshold"] == pytest.approx(strict)
    assert f"measured {result['measured']:.4g}" in line
    assert report["passed"] is False


def test_failing_gates_are_listed_in_one_line(run_cli, pair):
    result = _compare(run_cli, pair, "--min-sqnr", "1000", "--max-size-ratio", "0.001")
    assert result.code == 1
    (line,) = result.err.strip().splitlines()
    assert "min-sqnr: measured" in line and "max-size-ratio: measured" in line
    assert "needs >= 1000 dB" in line and "needs <= 0.001" in line


def test_gates_from_a_toml_file_and_options_override_it(run_cli, pair, tmp_path):
    gates = tmp_path / "qconvert.toml"
    gates.write_text("[gates]\nmin-sqnr = 1000\nmax-size-ratio = 10\n")
    failing = _compare(run_cli, pair, "--gates", gates, "--json")
    assert failing.code == 1
    assert "min-sqnr: measured" in failing.err
    assert [g["gate"] for g in json.loads(failing.out)["gates"]] == [
        "min-sqnr",
        "max-size-ratio",
    ]
    passing = _compare(run_cli, pair, "--gates", gates, "--min-sqnr", "0", "--json")
    assert passing.code == 0, passing.err
    assert [g["threshold"] for g in json.loads(passing.out)["gates"]] == [0.0, 10.0]


def test_gate_needing_labels_without_labels_is_a_usage_error(run_cli, pair, tmp_path):
    reference, candidate, evaluation = pair
    (evaluation / "labels.npy").unlink()
    result = run_cli(
        "compare", reference, candidate, "--data", evaluation, "--max-top1-drop", "1"
    )
    assert result.code == 2
    assert "--max-top1-drop needs labels" in result.err


def test_failed_gates_still_write_the_report(run_cli, pair, tmp_path):
    report = tmp_path / "report.json"
    result = _compare(run_cli, pair, "--min-sqnr", "1000", "--report", report)
    assert result.code == 1
    assert json.loads(report.read_text())["passed"] is False


# --- check-finite -------------------------------------------------------------------------


def _unary_model(op: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        unary (float[N,4] input) => (float[N,4] output) {{
            output = {op} (input)
        }}
        """
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def test_check_finite_names_the_output_and_the_sample(run_cli, tmp_path):
    reference = testing.save(_unary_model("Abs"), tmp_path / "abs.onnx")
    candidate = testing.save(_unary_model("Sqrt"), tmp_path / "sqrt.onnx")
    data = testing.write_samples(
        tmp_path / "data",
        [{"input": np.ones((1, 4), np.float32)}, {"input": -np.ones((1, 4), np.float32)}],
    )
    assert run_cli("compare", reference, candidate, "--data", data).code == 0
    report = tmp_path / "report.md"
    result = run_cli(
        "compare", reference, candidate, "--data", data, "--check-finite", "--report", report
    )
    assert result.code == 1
    assert result.err.strip() == (
        "Error: check-finite: the candidate model's output 'output' holds NaN or Inf on "
        f"sample '{data / 's00001.npy'}'."
    )
    assert not report.exists()


# --- renderings ---------------------------------------------------------------------------


def test_markdown_report_renders_as_tables(run_cli, pair, tmp_path):
    from markdown_it import MarkdownIt

    report = tmp_path / "report.md"
    result = _compare(run_cli, pair, "--report", report, "--min-sqnr", "0")
    assert result.code == 0, result.err
    text = report.read_text()
    html = MarkdownIt("commonmark").enable("table").render(text)
    assert html.count("<table>") == 3  # models, outputs, gates
    assert "<th>SQNR dB</th>" in html and "<td>logits</td>" in html
    assert "<td>min-sqnr</td>" in html and "<td>pass</td>" in html
    lines = text.splitlines()
    header = lines.index(
        "| output | SQNR dB | cosine | max abs err | mean abs err | rel err "
        "| top-1 agree | top-5 overlap |"
    )
    assert set(lines[header + 1].replace("|", "").split()) == {"---"}
    assert lines[header + 2].startswith("| logits | ")


def test_html_report_is_self_contained(run_cli, pair, tmp_path):
    report = tmp_path / "report.html"
    assert _compare(run_cli, pair, "--report", report, "--latency", "--runs", "3").code == 0
    text = report.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert text.count("<svg") == 3  # size, latency, SQNR per output
    for remote in ("http://", "https://", "<script", "<link", "@import", "url("):
        assert remote not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_unknown_report_suffix_is_a_usage_error(run_cli, pair, tmp_path):
    result = _compare(run_cli, pair, "--report", tmp_path / "report.pdf")
    assert result.code == 2
    assert "unknown format" in result.err


# --- bad inputs: exit 3, one line, nothing written ----------------------------------------


def test_models_with_different_input_names(run_cli, pair, tmp_path):
    reference, _, evaluation = pair
    model = onnx.load_model(str(reference))
    model.graph.input[0].name = "image"
    model.graph.node[0].input[0] = "image"
    other = testing.save(model, tmp_path / "renamed.onnx")
    report = tmp_path / "report.json"
    result = run_cli("compare", reference, other, "--data", evaluation, "--report", report)
    _assert_bad_input(result, "take different inputs", "(input) vs (image)", absent=[report])


def test_models_with_different_output_counts(run_cli, pair, tmp_path):
    reference, _, evaluation = pair
    model = onnx.load_model(str(reference))
    model.graph.output.append(onnx.helper.make_tensor_value_info("relu", 1, ["N", 8, 8, 8]))
    other = testing.save(model, tmp_path / "two_outputs.onnx")
    report = tmp_path / "report.json"
    result = run_cli("compare", reference, other, "--data", evaluation, "--report", report)
    _assert_bad_input(
        result, "give 1 and 2 outputs", "(logits) vs (logits, relu)", absent=[report]
    )


def test_data_that_fits_one_model_but_not_the_other(run_cli, tmp_path):
    reference = testing.save(testing.matmul_add(k=16), tmp_path / "k16.onnx")
    candidate = testing.save(testing.matmul_add(k=8), tmp_path / "k8.onnx")
    data = testing.write_samples(
        tmp_path / "data", [{"input": np.ones((1, 4, 16), np.float32)}]
    )
    saved = tmp_path / "outputs.npz"
    result = run_cli("compare", reference, candidate, "--data", data, "--save-outputs", saved)
    _assert_bad_input(
        result,
        "s00000.npy",
        "(1,4,16)",
        "expects (N,4,8)",
        f"(the candidate '{candidate}')",
        absent=[saved],
    )


def test_candidate_that_onnxruntime_cannot_load(run_cli, tmp_path):
    reference = testing.save(_unary_model("Abs"), tmp_path / "abs.onnx")
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
        custom (float[N,4] input) => (float[N,4] output) {
            output = com.example.Mystery (input)
        }
        """
    )
    candidate = testing.save(model, tmp_path / "custom.onnx")
    data = testing.write_samples(tmp_path / "data", [{"input": np.ones((1, 4), np.float32)}])
    report = tmp_path / "report.html"
    result = run_cli("compare", reference, candidate, "--data", data, "--report", report)
    _assert_bad_input(
        result, "onnxruntime cannot load the candidate model", "custom.onnx", absent=[report]
    )


def test_labels_file_of_the_wrong_length(run_cli, pair, tmp_path):
    np.save(tmp_path / "short.npy", np.zeros(5, np.int64))
    report = tmp_path / "report.json"
    result = _compare(run_cli, pair, "--labels", tmp_path / "short.npy", "--report", report)
    _assert_bad_input(result, "short.npy", "holds 5 labels for 24 samples", absent=[report])


def test_gates_file_with_an_unknown_gate(run_cli, pair, tmp_path):
    gates = tmp_path / "qconvert.toml"
    gates.write_text("[gates]\nmin-sqnr = 20\nmax-top5-drop = 1\n")
    report = tmp_path / "report.json"
    result = _compare(run_cli, pair, "--gates", gates, "--report", report)
    _assert_bad_input(
        result,
        "qconvert.toml",
        "unknown gate 'max-top5-drop'",
        "known gates:",
        absent=[report],
    )


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("[gates\n", "is not valid TOML"),
        ("[other]\nx = 1\n", "has no [gates] table"),
        ('[gates]\nmin-sqnr = "high"\n', "a threshold must be a number"),
    ],
    ids=["not-toml", "no-table", "not-a-number"],
)
def test_other_bad_gates_files(run_cli, pair, tmp_path, content, fragment):
    gates = tmp_path / "qconvert.toml"
    gates.write_text(content)
    _assert_bad_input(_compare(run_cli, pair, "--gates", gates), fragment)


def test_report_path_whose_folder_does_not_exist(run_cli, pair, tmp_path):
    report = tmp_path / "no" / "such" / "report.md"
    result = _compare(run_cli, pair, "--report", report)
    _assert_bad_input(result, "Report folder", "does not exist")
    assert not (tmp_path / "no").exists()


def test_wrong_number_of_models_is_a_usage_error(run_cli, pair):
    reference, _, evaluation = pair
    result = run_cli("compare", reference, "--data", evaluation)
    assert result.code == 2
    assert "expected REFERENCE CANDIDATE, got 1" in result.err


# --- other kinds of candidate -------------------------------------------------------------


def test_fp16_candidate_with_per_layer(run_cli, pair, tmp_path):
    from onnxconverter_common import float16

    reference, _, evaluation = pair
    fp16 = float16.convert_float_to_float16(
        onnx.load_model(str(reference)), keep_io_types=True
    )
    candidate = testing.save(fp16, tmp_path / "model.fp16.onnx")
    report = _json(run_cli, (reference, candidate, evaluation), "--per-layer")
    comparison = report["comparison"]
    assert comparison["outputs"][0]["sqnr_db"] > 50
    assert comparison["outputs"][0]["top1_agreement"] == 1.0
    layers = {layer["node"]: layer for layer in comparison["layers"]}
    assert {"conv", "bn", "relu", "pool", "flat"} <= layers.keys()
    assert all(layer["local_sqnr_db"] > 50 for layer in layers.values())


def test_per_layer_on_a_qdq_model_from_onnxruntimes_quantizer(run_cli, pair, tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    reference, _, evaluation = pair

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.files = iter(sorted((tmp_path / "calib").glob("s*.npy")))

        def get_next(self):
            path = next(self.files, None)
            return None if path is None else {"input": np.load(path)}

    candidate = tmp_path / "model.ort.int8.onnx"
    quantize_static(str(reference), str(candidate), Reader(), quant_format=QuantFormat.QDQ)
    report = _json(run_cli, (reference, candidate, evaluation), "--per-layer")
    layers = report["comparison"]["layers"]
    assert layers, "tensor names match, so layers are listed"
    assert [layer["local_sqnr_db"] for layer in layers] == sorted(
        layer["local_sqnr_db"] for layer in layers
    )


def test_quantize_eval_writes_the_same_report_as_markdown(run_cli, pair, tmp_path):
    reference, _, evaluation = pair
    out, report = tmp_path / "q.onnx", tmp_path / "report.md"
    result = run_cli(
        "quantize",
        reference,
        "--data",
        tmp_path / "calib",
        "--eval",
        evaluation,
        "-o",
        out,
        "--report",
        report,
    )
    assert result.code == 0, result.err
    text = report.read_text()
    assert text.startswith(f"# qconvert quantize: `{reference}`")
    for heading in ("## Conversion", "## Reference vs candidate on 24 samples", "## Outputs"):
        assert heading in text
    assert "| accuracy | 87.50% |" in text


def test_help_lists_compare(run_cli):
    result = run_cli("--help")
    assert "compare" in result.out
    result = run_cli("compare", "--help")
    for option in ("--max-top1-drop", "--gates", "--per-layer", "--load-outputs", "--json"):
        assert option in result.out
