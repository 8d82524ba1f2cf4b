"""The Python API: one function per verb, each returning a report.

The command line is a thin layer over these functions. Each verb's pipeline lives in its own
module under `qconvert.pipelines`; quantize runs its stages as a visible list:
load -> prepare -> calibrate -> plan -> rewrite -> verify -> save -> evaluate.
"""

from __future__ import annotations

from qconvert.pipelines.analyze import analyze, inspect
from qconvert.pipelines.calibrate import calibrate, merge
from qconvert.pipelines.compare import compare
from qconvert.pipelines.quantize import quantize

__all__ = ["analyze", "calibrate", "compare", "inspect", "merge", "quantize"]
