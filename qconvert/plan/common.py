"""What every planner shares: override checks, and why a node the user left float stays so."""

from __future__ import annotations

import onnx_ir as ir

from qconvert.errors import OverrideFileError
from qconvert.graph_utils import values_by_name
from qconvert.overrides import FLOAT, Overrides
from qconvert.selection import NodeSelection


def check_overrides(
    model: ir.Model, overrides: Overrides, *, static: bool, scheme: str
) -> None:
    """Fails on an override the model or the scheme cannot take.

    That is a node or tensor the model lacks, or a precision the scheme cannot apply.

    Raises:
        OverrideFileError: naming the file and the offending entry.
    """
    graph = model.graph
    node_names = {node.name for node in graph}
    for name, precision in overrides.nodes.items():
        if name not in node_names:
            raise OverrideFileError(
                f"Override file '{overrides.source}' names node '{name}', which the model "
                "does not have."
            )
        if static and precision == "int4":
            raise OverrideFileError(
                f"Override file '{overrides.source}' sets node '{name}' to 'int4', which "
                f"a --scheme {scheme} run cannot apply.",
                hint="int4 weights come from --scheme int4.",
            )
        if not static and precision not in (FLOAT, scheme):
            raise OverrideFileError(
                f"Override file '{overrides.source}' sets node '{name}' to '{precision}', "
                f"which a --scheme {scheme} run cannot apply.",
                hint="in this scheme a node override can only be 'float'.",
            )
    values = values_by_name(graph)
    for name in overrides.tensors:
        if name not in values:
            raise OverrideFileError(
                f"Override file '{overrides.source}' names tensor '{name}', which the "
                "model does not have."
            )
        if not static:
            raise OverrideFileError(
                f"Override file '{overrides.source}' sets tensor '{name}', but tensor "
                f"overrides apply to the static schemes only, not --scheme {scheme}."
            )


def skip_reason(
    node: ir.Node,
    selection: NodeSelection,
    overrides: Overrides,
    excluded: frozenset[str] = frozenset(),
) -> str | None:
    """Why `node` stays float by the user's choice (or mixed precision's), or None."""
    if node.name in excluded:
        return "excluded: stays float"
    if overrides.nodes.get(node.name or "") == FLOAT:
        return f"set to float by {overrides.source}"
    return selection.skip_reason(node)
