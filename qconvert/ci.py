"""CI integration: GitHub job summaries and annotations, and JUnit XML for GitLab/Jenkins.

- `append_step_summary`: when `GITHUB_STEP_SUMMARY` names a file (GitHub Actions sets it
  for each step), the Markdown report is appended to it and shows on the run's page.
- `gate_annotations`: one `::error::` workflow command per failed gate, naming the gate
  and the figure; GitHub shows each as an error on the run.
- `junit_xml`: one test case per gate, a failure for each failed one, in the JUnit XML
  that GitLab's `artifacts:reports:junit` and Jenkins' `junit` step read.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

from qconvert.errors import OutputError
from qconvert.model import write_atomically

if TYPE_CHECKING:
    from qconvert.report import Report

logger = logging.getLogger(__name__)

SUMMARY_LIMIT = 1_000_000
"""GitHub refuses a step summary over 1 MiB; a longer report is cut to this many bytes."""


def in_github_actions() -> bool:
    """True inside a GitHub Actions step."""
    return os.environ.get("GITHUB_ACTIONS") == "true" or bool(
        os.environ.get("GITHUB_STEP_SUMMARY")
    )


def append_step_summary(report: Report) -> bool:
    """Appends the Markdown report to `$GITHUB_STEP_SUMMARY`; True when it did.

    A summary that cannot be written costs a warning, not the run.
    """
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return False
    text = report.to_markdown()
    data = text.encode()
    if len(data) > SUMMARY_LIMIT:
        cut = data[:SUMMARY_LIMIT].decode(errors="ignore").rsplit("\n", 1)[0]
        data = (
            cut + "\n\n*Report cut to GitHub's summary limit; see the JSON report.*\n"
        ).encode()
    try:
        with open(path, "ab") as stream:
            stream.write(data + b"\n")
    except OSError as exc:
        logger.warning("could not append the job summary to '%s': %s", path, exc.strerror)
        return False
    return True


def gate_annotations(report: Report) -> list[str]:
    """`::error title=...::message` lines, one per failed gate."""
    return [
        f"::error title={_property(f'qconvert gate {gate.gate}')}::"
        f"{_message(f'gate {gate.describe()}')}"
        for gate in report.failed_gates
    ]


def check_junit_path(path: str | os.PathLike[str]) -> None:
    """Fails before any work when the JUnit file's folder does not exist.

    Raises:
        OutputError: the folder is missing.
    """
    folder = Path(path).parent
    if not folder.is_dir():
        raise OutputError(f"JUnit folder '{folder}' does not exist.")


def junit_xml(report: Report) -> bytes:
    """The gates as a JUnit test suite: one test case per gate.

    With no gate set, one passing case says the comparison ran, so the file is never an
    empty suite (which some readers count as an error).
    """
    failures = report.failed_gates
    seconds = sum(report.seconds.values())
    suites = ET.Element("testsuites", name="qconvert")
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=f"qconvert {report.command}",
        tests=str(max(len(report.gates), 1)),
        failures=str(len(failures)),
        errors="0",
        skipped="0",
        time=f"{seconds:.3f}",
    )
    properties = ET.SubElement(suite, "properties")
    for name, value in (("model", report.model), ("output", report.output)):
        if value is not None:
            ET.SubElement(properties, "property", name=name, value=str(value))
    if report.comparison is not None:
        ET.SubElement(
            properties, "property", name="candidate", value=report.comparison.candidate.path
        )
    classname = f"qconvert.{report.command}"
    for gate in report.gates:
        case = ET.SubElement(suite, "testcase", classname=classname, name=gate.gate, time="0")
        if not gate.passed:
            failure = ET.SubElement(
                case, "failure", message=gate.describe(), type="GateFailed"
            )
            failure.text = gate.describe()
        ET.SubElement(case, "system-out").text = gate.describe()
    if not report.gates:
        ET.SubElement(suite, "testcase", classname=classname, name=report.command, time="0")
    ET.indent(suites)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True) + b"\n"


def write_junit(report: Report, path: str | os.PathLike[str]) -> None:
    """Writes `junit_xml(report)` to `path`, atomically."""
    write_atomically(Path(path), junit_xml(report))


def _message(text: str) -> str:
    """A workflow command's message: %, CR and LF escaped."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _property(text: str) -> str:
    """A workflow command's property value: also ':' and ',' escaped."""
    return _message(text).replace(":", "%3A").replace(",", "%2C")
