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
