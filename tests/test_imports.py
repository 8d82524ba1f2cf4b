"""What importing qconvert costs: sympy stays out of the calibrate and quantize paths.

onnx_ir imports sympy at its top (about 40 MB and up to 1 s), for symbolic dimension
arithmetic that no qconvert stage uses; `qconvert/_lazy_imports.py` defers it. Each test
runs a fresh interpreter, since this one may have imported sympy through another package.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from qconvert import testing


def _run(script: str, cwd: Path) -> str:
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.strip()


def _model_and_data(tmp_path: Path) -> tuple[Path, Path]:
    model = testing.conv_bn_relu()
    path = testing.save(model, tmp_path / "model.onnx")
    samples = [testing.random_inputs(model, seed=seed) for seed in range(4)]
    return path, testing.write_samples(tmp_path / "calib", samples)


def test_calibrate_and_quantize_do_not_import_sympy(tmp_path):
    model, data = _model_and_data(tmp_path)
    out = _run(
        f"""
        import sys
        import qconvert
        import qconvert.cli
        before = "sympy.core" in sys.modules
        qconvert.calibrate({str(model)!r}, {str(data)!r}, output="c.json", workers=1)
        after_calibrate = "sympy.core" in sys.modules
        qconvert.quantize({str(model)!r}, "q.onnx", calib="c.json")
        print(before, after_calibrate, "sympy.core" in sys.modules)
        """,
        tmp_path,
    )
    assert out == "False False False"
    assert (tmp_path / "q.onnx").is_file()


def test_symbolic_dimensions_still_work_once_asked_for(tmp_path):
    out = _run(
        """
        import sys
        import qconvert
        import onnx_ir as ir
        loaded = "sympy.core" in sys.modules
        dim = ir.SymbolicDim("N") * 2 + 1
        from sympy import Symbol
        print(loaded, dim, Symbol("x") + 1, "sympy.core" in sys.modules)
        """,
        tmp_path,
    )
    assert out == "False 2*N + 1 x + 1 True"


def test_sympy_imported_first_is_left_alone(tmp_path):
    out = _run(
        """
        import sys
        import sympy
        import qconvert
        import onnx_ir as ir
        print(sys.modules["sympy"] is sympy, ir.SymbolicDim("N") + 1)
        """,
        tmp_path,
    )
    assert out == "True N + 1"


def test_the_calibrate_command_imports_no_other_verbs_stages(tmp_path):
    # The quantize, compare and analyze pipelines cost about 0.1 s of CPU and a few MB
    # that a calibration (or `--help`) never uses.
    model, data = _model_and_data(tmp_path)
    out = _run(
        f"""
        import sys
        from click.testing import CliRunner
        from qconvert.cli import cli
        loaded_by_cli = sorted(
            name for name in ("qconvert.api", "onnxruntime", "onnx_ir") if name in sys.modules
        )
        result = CliRunner().invoke(
            cli, ["calibrate", {str(model)!r}, "--data", {str(data)!r}, "-o", "c.json"]
        )
        assert result.exit_code == 0, result.output
        heavy = ("qconvert.api", "qconvert.pipelines.quantize_stages",
                 "qconvert.pipelines.recipe", "qconvert.compare", "qconvert.report",
                 "qconvert.fusion_audit")
        print(loaded_by_cli, [name for name in heavy if name in sys.modules])
        """,
        tmp_path,
    )
    assert out == "[] []"
    assert (tmp_path / "c.json").is_file()


def test_the_verbs_keep_their_names_when_their_modules_are_imported(tmp_path):
    # `qconvert.compare` is both a verb and a module; importing the module late must not
    # put it in the verb's place.
    out = _run(
        """
        import qconvert
        import qconvert.compare
        from qconvert.compare import compare_models
        print(callable(qconvert.compare), qconvert.compare.__module__,
              qconvert.QuantizeConfig.__name__, qconvert.quantize.__name__)
        """,
        tmp_path,
    )
    assert out == "True qconvert.pipelines.compare QuantizeConfig quantize"
