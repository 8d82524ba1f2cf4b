"""Numbers as the reports show them, the same in every rendering."""

from __future__ import annotations

import math
from collections.abc import Callable


def db(value: float | None) -> str:
    """Decibels with two decimals; inf as "inf"."""
    if value is None or math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.2f}"


def percent(share: float | None) -> str:
    """A share in 0..1 as a percentage with two decimals."""
    return "-" if share is None or math.isnan(share) else f"{share:.2%}"


def points(value: float | None) -> str:
    """Percentage points, signed."""
    return "-" if value is None else f"{value:+.2f} points"


def ratio(value: float | None) -> str:
    """A ratio as `0.443x`."""
    return "-" if value is None or math.isnan(value) else f"{value:.3f}x"


def number(value: float | None) -> str:
    """Four significant digits."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.4g}"


def size(count: int | None) -> str:
    """Bytes in B, KiB, MiB or GiB."""
    if count is None:
        return "-"
    amount = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return str(count)


def milliseconds(value: float | None) -> str:
    """Milliseconds with three significant decimals."""
    return "-" if value is None else f"{value:.3f} ms"


OUTPUT_HEADER = [
    "output",
    "SQNR dB",
    "cosine",
    "max abs err",
    "mean abs err",
    "rel err",
    "top-1 agree",
    "top-5 overlap",
]
"""The columns of `output_rows`."""


def output_rows(comparison) -> list[list[str]]:
    """The per-output fidelity table, one row per output, columns as `OUTPUT_HEADER`.

    One definition for the terminal, Markdown and HTML renderings.
    """
    return [
        [
            out.name,
            db(out.sqnr_db),
            f"{out.cosine:.5f}",
            number(out.max_abs_error),
            number(out.mean_abs_error),
            number(out.relative_error),
            percent(out.top1_agreement),
            percent(out.top5_overlap),
        ]
        for out in comparison.outputs
    ]


LAYER_ERROR_HEADER = ["local SQNR dB", "SQNR dB", "cosine", "max abs err"]
"""The columns of `layer_error_cells`."""


def layer_error_cells(layer) -> list[str]:
    """One layer's error figures, columns as `LAYER_ERROR_HEADER`.

    One definition for the terminal, Markdown and HTML per-layer tables; each puts its own
    columns (rank, position, node, op, tensor) before them.
    """
    return [
        db(layer.local_sqnr_db),
        db(layer.sqnr_db),
        f"{layer.cosine:.5f}",
        number(layer.max_abs_error),
    ]


def conversion_rows(conversion, output) -> list[list[str]]:
    """The conversion summary, rows of [what, value], written to `output`.

    One definition for the terminal, Markdown and HTML renderings.
    """
    quantized = ", ".join(f"{op} x{n}" for op, n in conversion.quantized_ops.items())
    rows = [
        ["scheme / format", f"{conversion.scheme} / {conversion.format}"],
        ["opset", f"{conversion.opset_before} -> {conversion.opset_after}"],
        ["float size", size(conversion.float_bytes)],
        ["quantized size", size(conversion.converted_bytes)],
        ["size ratio", f"{conversion.size_ratio:.1%}"],
        ["calibration samples", str(conversion.calibration_samples)],
        ["quantized nodes", quantized or "none"],
    ]
    if conversion.range_methods:
        rows.append(["ranges (auto)", conversion.range_summary])
    if conversion.folded_clamps:
        rows.append(["clamps folded", str(len(conversion.folded_clamps))])
    rows.append(["nodes left float", str(len(conversion.float_nodes))])
    if conversion.fusion_audit is not None:
        rows.append(["integer kernels (onnxruntime)", kernels(conversion.fusion_audit)])
        rows.append(["float islands", islands(conversion.fusion_audit)])
    rows.append(["written to", str(output)])
    return rows


WEIGHT_RANGE_HEADER = [
    "weight",
    "channels",
    "min range",
    "median range",
    "max range",
    "spread",
]


def weight_range_rows(rows) -> list[list[str]]:
    """The per-channel weight range table, columns as `WEIGHT_RANGE_HEADER`.

    One definition for the Markdown and HTML renderings.
    """
    return [
        [
            row.tensor,
            str(row.channels),
            number(row.min_range),
            number(row.median_range),
            number(row.max_range),
            number(row.spread),
        ]
        for row in rows
    ]


def comparison_rows(comparison, path: Callable[[str], str] = str) -> list[list[str]]:
    """The reference-vs-candidate table, rows of [what, reference, candidate, ratio].

    One definition for the terminal and Markdown renderings; `path` formats model paths
    (Markdown puts them in backticks).
    """
    ref, cand = comparison.reference, comparison.candidate
    rows = [
        ["model", path(ref.path), path(cand.path), ""],
        ["size", size(ref.bytes), size(cand.bytes), ratio(comparison.size_ratio)],
    ]
    if comparison.reference_accuracy is not None:
        rows.append(
            [
                "accuracy",
                percent(comparison.reference_accuracy),
                percent(comparison.candidate_accuracy),
                f"drop {points(comparison.accuracy_drop_points)}",
            ]
        )
    if ref.latency is not None or cand.latency is not None:
        for label, pick, last in (
            ("latency median", "median_ms", ratio(comparison.latency_ratio)),
            ("latency p90", "p90_ms", ""),
        ):
            rows.append(
                [
                    label,
                    milliseconds(getattr(ref.latency, pick, None)),
                    milliseconds(getattr(cand.latency, pick, None)),
                    last,
                ]
            )
    rows.append(["provider", ref.provider, cand.provider, ""])
    return rows


NAMES_SHOWN = 3
"""Node names a grouped row shows before it counts the rest."""


def float_node_groups(float_nodes) -> list[list[str]]:
    """The nodes left float, one row per (op, reason): [nodes, op, reason].

    A transformer leaves hundreds of Reshapes and Transposes float for one reason; a row
    each would bury the few that matter. The nodes column names the first few and counts
    the rest; the JSON, Markdown and HTML reports keep every node.
    """
    groups: dict[tuple[str, str], list[str]] = {}
    for node in float_nodes:
        groups.setdefault((node.op_type, node.reason), []).append(node.name)
    rows = []
    for (op_type, reason), names in groups.items():
        shown = ", ".join(names[:NAMES_SHOWN])
        if len(names) > NAMES_SHOWN:
            shown += f" and {len(names) - NAMES_SHOWN} more"
        rows.append([shown, f"{op_type} x{len(names)}", reason])
    return rows


def kernels(audit) -> str:
    """A fusion audit's integer kernels: `QLinearConv x10, QGemm x1 (11 in all)`."""
    if not audit.integer_kernels:
        return "none"
    listed = ", ".join(f"{op} x{n}" for op, n in audit.integer_kernels.items())
    return f"{listed} ({audit.kernel_count} in all)"


def islands(audit) -> str:
    """A fusion audit's float islands: `2 (1 not planned): Pad x1, Resize x1`."""
    lost = f"; {len(audit.lost)} planned float, ran as integers" if audit.lost else ""
    if not audit.islands:
        return "none" + lost
    unplanned = len(audit.unplanned)
    by_op = ", ".join(f"{op} x{n}" for op, n in audit.islands_by_op().items())
    return f"{len(audit.islands)} ({unplanned} not planned): {by_op}{lost}"


def island_rows(audit) -> list[list[str]]:
    """One row per island node: node, op, whether the plan meant it, why.

    Then one row per node planned float that onnxruntime ran on the integers.
    """
    return [
        [
            node.name,
            node.op_type,
            "planned" if island.planned else "NOT planned",
            node.reason,
        ]
        for island in audit.islands
        for node in island.nodes
    ] + [
        [node.name, node.op_type, f"planned float, ran as {node.ran_as}", node.reason]
        for node in audit.lost
    ]
