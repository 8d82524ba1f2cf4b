from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from qconvert import testing
from qconvert.cli import main

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture(autouse=True)
def _outside_github_actions(monkeypatch):
    """Tests run as on a developer's machine, even inside a GitHub Actions job: no job
    summary appended, no annotations (the CI tests set these variables themselves)."""
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


@pytest.fixture
def run_cli(capsys):
    """Runs the qconvert command line in-process; returns exit code, stdout and stderr."""

    def run(*args: str | Path) -> CliResult:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main([str(arg) for arg in args])
        captured = capsys.readouterr()
        return CliResult(int(exit_info.value.code or 0), captured.out, captured.err)

    return run


@pytest.fixture
def tiny_cnn(tmp_path) -> Path:
    """A Conv+BN+Relu+MaxPool+Gemm model with 32 calibration samples beside it."""
    model = testing.conv_bn_relu()
    path = testing.save(model, tmp_path / "model.onnx")
    testing.write_samples(
        tmp_path / "calib", [testing.random_inputs(model, seed=i) for i in range(32)]
    )
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
