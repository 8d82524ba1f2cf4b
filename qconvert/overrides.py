"""Per-node and per-tensor precision for mixed-precision runs, read from a TOML or JSON file.

The file has two optional tables, keyed by exact node or tensor name:

    [nodes]                 # node -> scheme
    "conv_1" = "float"      # leave this node float
    "fc_1" = "16x8"         # int16 activations around this node in an int8 run
    "fc_2" = "int8"         # in an int4 run: 8-bit blocks for this node's weight

    [tensors]               # tensor -> type
    "relu_1_out" = "int16"  # quantize this activation to int16
    "fc_w" = "float"        # keep this weight float

(JSON: `{"nodes": {...}, "tensors": {...}}`.) Overrides edit the plan, never the code: the
planner applies them and the report shows them. Names the model lacks are errors, checked
by the planner once the model is known.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np

from qconvert.errors import OverrideFileError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

FLOAT = "float"
NODE_PRECISIONS = (FLOAT, "int8", "16x8", "int4")
"""What a node may be set to: left float, one of the static schemes, or (int4 runs) 4-bit
or 8-bit blocked weights."""
TENSOR_PRECISIONS: dict[str, np.dtype | None] = {
    FLOAT: None,
    "uint8": np.dtype(np.uint8),
    "int8": np.dtype(np.int8),
    "int16": np.dtype(np.int16),
}
"""What a tensor may be set to: left float, or an integer type."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Overrides:
    """Node -> scheme and tensor -> type, from the file named by `source`."""

    nodes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    tensors: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    source: str = ""

    def __bool__(self) -> bool:
        return bool(self.nodes or self.tensors)

    def uses_int16(self) -> bool:
        """True when some override asks for int16 activations (opset 21 needed)."""
        return "16x8" in self.nodes.values() or "int16" in self.tensors.values()

    def tensor_dtype(self, name: str) -> np.dtype | None:
        """The integer type a tensor is set to, or None (not overridden, or float)."""
        return TENSOR_PRECISIONS[self.tensors[name]] if name in self.tensors else None


def load_overrides(path: str | os.PathLike[str]) -> Overrides:
    """Reads an override file (`.toml` or `.json`).

    Raises:
        OverrideFileError: the file is missing, unreadable, not a table of tables, or
            names an unknown scheme or type.
    """
    path = Path(path)
    if not path.is_file():
        raise OverrideFileError(f"Override file '{path}' does not exist.")
    if path.suffix not in (".toml", ".json"):
        raise OverrideFileError(
            f"Override file '{path}' has an unknown format.", hint="use .toml or .json."
        )
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise OverrideFileError(f"Override file '{path}' could not be read: {first}") from None
    if not isinstance(data, dict):
        raise OverrideFileError(f"Override file '{path}' must hold a table.")
    unknown = sorted(set(data) - {"nodes", "tensors"})
    if unknown:
        raise OverrideFileError(
            f"Override file '{path}' has an unknown table '{unknown[0]}'.",
            hint="use [nodes] and [tensors].",
        )
    nodes = _table(path, data, "nodes", NODE_PRECISIONS, "scheme")
    tensors = _table(path, data, "tensors", tuple(TENSOR_PRECISIONS), "type")
    return Overrides(
        nodes=MappingProxyType(nodes), tensors=MappingProxyType(tensors), source=str(path)
    )


def _table(
    path: Path, data: dict, key: str, allowed: tuple[str, ...], what: str
) -> dict[str, str]:
    table = data.get(key, {})
    if not isinstance(table, dict):
        raise OverrideFileError(f"Override file '{path}': '{key}' must be a table.")
    for name, value in table.items():
        if not isinstance(value, str) or value not in allowed:
            raise OverrideFileError(
                f"Override file '{path}' sets {key[:-1]} '{name}' to unknown {what} "
                f"'{value}'.",
                hint=f"choose from {', '.join(allowed)}.",
            )
    return dict(sorted(table.items()))
