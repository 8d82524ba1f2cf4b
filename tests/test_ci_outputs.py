"""CI summaries: the GitHub step summary, `::error::` annotations and the JUnit file."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import qconvert
from qconvert import testing


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path, Path]:
    """A float model, its int8 version and the samples."""
    model = testing.conv_bn_relu()
    path = testing.save(model, tmp_path / "model.onnx")
    data = testing.write_samples(
        tmp_path / "calib", [testing.random_inputs(model, seed=i) for i in range(8)]
    )
    candidate = tmp_path / "model.int8.onnx"
    qconvert.quantize(path, candidate, data=data)
    return path, candidate, data


def test_quantize_appends_the_markdown_report_to_the_step_summary(
    run_cli, pair, tmp_path, monkeypatch
):
    model, _, data = pair
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    out = tmp_path / "again.onnx"
    result = run_cli("quantize", model, "--data", data, "-o", out, "--json")
    assert result.code == 0, result.err
    report = qconvert.quantize(model, tmp_path / "third.onnx", data=data)
    text = summary.read_text()
    assert text.startswith("earlier step\n# qconvert quantize: ")
    assert "## Conversion" in text and "## Nodes by op type and precision" in text
    # The same tables as the Markdown report, but for the output path.
    expected = report.to_markdown().replace(str(tmp_path / "third.onnx"), str(out))
    assert text == "earlier step\n" + expected + "\n"


def test_a_failed_gate_is_annotated_and_summarized(run_cli, pair, tmp_path, monkeypatch):
    model, candidate, data = pair
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = run_cli(
        "compare", model, candidate, "--data", data, "--min-sqnr", "1000",
        "--max-size-ratio", "1",
    )  # fmt: skip
    assert result.code == 1
    errors = [line for line in result.out.splitlines() if line.startswith("::error")]
    assert len(errors) == 1, result.out
    measured = qconvert.compare(model, candidate, data=data).comparison.outputs[0].sqnr_db
    assert errors[0] == (
        "::error title=qconvert gate min-sqnr::gate min-sqnr: measured "
        f"{measured:.4g} dB, needs >= 1000 dB"
    )
    text = summary.read_text()
    assert "Result: **gates failed**." in text
    assert "| min-sqnr | 1000 |" in text and "**FAIL**" in text


def test_annotations_go_to_stderr_when_stdout_is_json(run_cli, pair, monkeypatch):
    model, candidate, data = pair
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    result = run_cli(
        "compare", model, candidate, "--data", data, "--min-sqnr", "1000", "--json"
    )
    assert result.code == 1
    assert json.loads(result.out)["passed"] is False
    assert "::error title=qconvert gate min-sqnr::" in result.err


def test_no_annotation_outside_github(run_cli, pair, monkeypatch):
    model, candidate, data = pair
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    result = run_cli("compare", model, candidate, "--data", data, "--min-sqnr", "1000")
    assert result.code == 1
    assert "::error" not in result.out + result.err


def test_junit_has_one_case_per_gate(run_cli, pair, tmp_path):
    model, candidate, data = pair
    junit = tmp_path / "gates.xml"
    result = run_cli(
        "compare", model, candidate, "--data", data, "--min-sqnr", "1000",
        "--max-size-ratio", "1", "--min-cosine", "0.5", "--junit", junit, "--json",
    )  # fmt: skip
    assert result.code == 1
    report = json.loads(result.out)
    root = ET.parse(junit).getroot()
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("3", "1")
    cases = {case.get("name"): case for case in suite.findall("testcase")}
    assert set(cases) == {"min-sqnr", "max-size-ratio", "min-cosine"}
    assert all(case.get("classname") == "qconvert.compare" for case in cases.values())
    (failure,) = cases["min-sqnr"].findall("failure")
    measured = next(g["measured"] for g in report["gates"] if g["gate"] == "min-sqnr")
    assert failure.get("message") == f"min-sqnr: measured {measured:.4g} dB, needs >= 1000 dB"
    assert cases["max-size-ratio"].findall("failure") == []
    assert cases["min-cosine"].findall("failure") == []
    properties = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert properties["candidate"] == str(candidate)


def test_junit_without_gates_has_one_passing_case(run_cli, pair, tmp_path):
    model, candidate, data = pair
    junit = tmp_path / "gates.xml"
    result = run_cli("compare", model, candidate, "--data", data, "--junit", junit)
    assert result.code == 0, result.err
    suite = ET.parse(junit).getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("1", "0")
    assert [case.get("name") for case in suite.findall("testcase")] == ["compare"]


def test_junit_folder_missing_fails_before_the_comparison(run_cli, pair, tmp_path):
    model, candidate, data = pair
    junit = tmp_path / "missing" / "gates.xml"
    result = run_cli("compare", model, candidate, "--data", data, "--junit", junit)
    assert result.code == 3
    assert result.err == f"Error: JUnit folder '{junit.parent}' does not exist.\n"
    assert result.out == ""
