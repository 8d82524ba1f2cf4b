"""Data goes one way (DESIGN.md): the report layer renders, never reaches into a pipeline."""

from __future__ import annotations

import ast
from pathlib import Path

import qconvert

PACKAGE = Path(qconvert.__file__).parent

REPORT_LAYER = sorted(
    [
        *PACKAGE.glob("report*.py"),
        PACKAGE / "formatting.py",
        PACKAGE / "recipe_result.py",
    ]
)


def _imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def test_the_report_layer_imports_no_pipeline():
    assert len(REPORT_LAYER) >= 6, REPORT_LAYER
    offenders = {
        path.name: sorted(
            m for m in _imported_modules(path) if m.startswith("qconvert.pipelines")
        )
        for path in REPORT_LAYER
    }
    assert not {name: found for name, found in offenders.items() if found}


def test_the_import_walk_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "late.py"
    module.write_text("def f():\n    from qconvert.pipelines.recipe import run_recipe\n")
    assert "qconvert.pipelines.recipe" in _imported_modules(module)
