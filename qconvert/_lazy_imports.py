"""Defers sympy, which onnx_ir imports at its top but qconvert never needs.

onnx_ir (1.1) imports sympy in `onnx_ir._core` and `onnx_ir._symbolic_shapes` for symbolic
dimension arithmetic (`SymbolicDim + 1`, shape expressions), which no qconvert stage uses.
Importing sympy costs about 40 MB of resident memory and 0.25-1 s in every process that
imports qconvert: each command, and each calibration worker `--workers auto` spawns. Against
a 64-sample float pass of a small model (0.1-1 s, 70-120 MB) that fixed cost alone broke
the calibration targets of issue 18.

`install()`, called when this module is imported, puts a stand-in for both modules into
`sys.modules`. The first attribute read from a stand-in (`sympy.Max`, `sympy.Expr`, ...)
imports the real module, which replaces the stand-in in `sys.modules`; the stand-in
forwards every read to it from then on. So code that does use symbolic arithmetic gets the
real sympy, only later. It must run before the first `import onnx_ir`; where onnx_ir is
already imported it changes nothing.

The standard library's `importlib.util.LazyLoader` does not do here: on Python 3.11 the
import statement itself reads the module's `__spec__`, which loads a lazy module at once.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types

# onnx_ir's own module that builds a table of sympy functions at import: deferred with
# sympy, or that table would import sympy at once.
_DEFERRED = ("sympy", "onnx_ir._symbolic_shapes")

_LOCK = threading.RLock()


def install() -> None:
    """Registers stand-ins for sympy and onnx_ir's symbolic-shape module."""
    if "onnx_ir" in sys.modules:  # too late: onnx_ir has imported sympy already
        return
    for name in _DEFERRED:
        if name not in sys.modules and _installed(name):
            sys.modules[name] = _stand_in(name)


def _installed(name: str) -> bool:
    """Whether `name` can be imported, found without importing anything."""
    top = name.partition(".")[0]
    return importlib.util.find_spec(top) is not None  # a top-level name: found, not imported


def _stand_in(name: str) -> types.ModuleType:
    """A module whose first attribute read imports the real `name` and forwards to it."""
    stand_in = types.ModuleType(name, f"Stand-in for {name}, imported on first use.")
    # The import system reads `__spec__._initializing` of a module found in sys.modules;
    # None tells it the module is ready, without a read that would load the real one.
    stand_in.__spec__ = None
    real: list[types.ModuleType] = []

    def __getattr__(attribute: str) -> object:  # the module hook of PEP 562
        with _LOCK:
            if not real:
                if sys.modules.get(name) is stand_in:
                    del sys.modules[name]
                real.append(importlib.import_module(name))
        return getattr(real[0], attribute)

    stand_in.__getattr__ = __getattr__  # type: ignore[method-assign]
    return stand_in


install()
