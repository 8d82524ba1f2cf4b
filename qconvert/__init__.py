"""qconvert: post-training quantization of ONNX models.

Example::

    import qconvert
    report = qconvert.quantize("model.onnx", "model.int8.onnx", data="calib/")
    print(report.size_ratio)
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# First, before anything imports onnx_ir (isort keeps `qconvert` ahead of `qconvert.*`):
# importing it defers sympy, see its docstring.
from qconvert import _lazy_imports  # noqa: F401

# The verbs and their config are imported on first use (PEP 562): `import qconvert` is
# what every command and every calibration worker pays, and the verbs' pipelines import
# every stage of every verb (about 0.3 s of CPU and 30 MB), most of which `qconvert
# calibrate` never runs.
_LAZY = {
    "analyze": "qconvert.api",
    "calibrate": "qconvert.api",
    "compare": "qconvert.api",
    "inspect": "qconvert.api",
    "quantize": "qconvert.api",
    "QuantizeConfig": "qconvert.config",
    "QconvertError": "qconvert.errors",
}

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


class _Package(types.ModuleType):
    """The package's module type: a submodule never takes the name of a verb.

    Importing `qconvert.compare` (the comparison's module) binds it as the package's
    attribute `compare`, the verb's name; eagerly imported, the verb was bound after and
    won. The verb keeps it here however late it is imported.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> object:
    """The verbs and config of `__all__`, imported when first read."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qconvert' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
