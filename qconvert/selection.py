"""Which nodes a run may convert: `--exclude` and `--include-only` patterns.

A pattern is a glob (`fnmatch`, case-sensitive) matched against a node's name and against
its op type, so `--exclude Conv` leaves every Conv float and `--exclude 'head.*'` the
nodes whose names start with `head.`. A pattern that matches no node is most likely a
typo: the run goes on and logs a warning naming it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fnmatch import fnmatchcase

import onnx_ir as ir

logger = logging.getLogger("qconvert")


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeSelection:
    """Exclusion and inclusion patterns over node names and op types."""

    exclude: tuple[str, ...] = ()
    include_only: tuple[str, ...] = ()

    def skip_reason(self, node: ir.Node) -> str | None:
        """Why the node must stay float, or None when it may be converted."""
        for pattern in self.exclude:
            if _matches(pattern, node):
                return f"excluded by --exclude '{pattern}'"
        if self.include_only and not any(_matches(p, node) for p in self.include_only):
            return "not matched by --include-only"
        return None

    def warn_unmatched(self, graph: ir.Graph) -> tuple[str, ...]:
        """Logs a warning for each pattern that matches no node; returns those patterns."""
        nodes = list(graph)
        unmatched = []
        for option, patterns in (
            ("--exclude", self.exclude),
            ("--include-only", self.include_only),
        ):
            for pattern in patterns:
                if not any(_matches(pattern, node) for node in nodes):
                    logger.warning(
                        "%s '%s' matches no node name or op type in the model.",
                        option,
                        pattern,
                    )
                    unmatched.append(pattern)
        return tuple(unmatched)


def _matches(pattern: str, node: ir.Node) -> bool:
    return fnmatchcase(node.name or "", pattern) or fnmatchcase(node.op_type, pattern)
