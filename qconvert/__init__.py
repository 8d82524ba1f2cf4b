"""qconvert: post-training quantization of ONNX models.

Example::

    import qconvert
    report = qconvert.quantize("model.onnx", "model.int8.onnx", data="calib/")
    print(report.size_ratio)
"""

from __future__ import annotations

__version__ = "0.1.0"

# First, before anything imports onnx_ir (isort keeps `qconvert` ahead of `qconvert.*`):
# importing it defers sympy, see its docstring.
from qconvert import _lazy_imports  # noqa: F401
from qconvert.api import analyze, calibrate, compare, inspect, quantize
from qconvert.config import QuantizeConfig
from qconvert.errors import QconvertError

__all__ = [
    "QconvertError",
    "QuantizeConfig",
    "__version__",
    "analyze",
    "calibrate",
    "compare",
    "inspect",
    "quantize",
]
