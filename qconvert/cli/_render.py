"""Rich renderings of reports and summaries for the terminal."""

from __future__ import annotations

import math
from pathlib import Path

from rich.table import Table

from qconvert.cli._console import stdout
from qconvert.inspection import ModelSummary
from qconvert.report import Report


def report(result: Report) -> None:
    """The quantize report: sizes, quantized ops, float nodes, accuracy."""
    conversion = result.conversion
    if conversion is not None:
        table = Table(title=f"qconvert {result.command}: {result.model}", title_justify="left")
        table.add_column("")
        table.add_column("value", justify="right")
        table.add_row("scheme / format", f"{conversion.scheme} / {conversion.format}")
        table.add_row("opset", f"{conversion.opset_before} -> {conversion.opset_after}")
        table.add_row("float size", _bytes(conversion.float_bytes))
        table.add_row("quantized size", _bytes(conversion.converted_bytes))
        table.add_row("size ratio", f"{conversion.size_ratio:.1%}")
        table.add_row("calibration samples", str(conversion.calibration_samples))
        quantized = ", ".join(f"{op} x{n}" for op, n in conversion.quantized_ops.items())
        table.add_row("quantized nodes", quantized or "none")
        if conversion.folded_clamps:
            table.add_row("clamps folded", str(len(conversion.folded_clamps)))
        table.add_row("nodes left float", str(len(conversion.float_nodes)))
        table.add_row("written to", str(result.output))
        stdout.print(table)
        for note in conversion.notes:
            stdout.print(f"note: {note}")
        if conversion.float_nodes:
            floats = Table(title="Nodes left float", title_justify="left")
            for column in ("node", "op", "reason"):
                floats.add_column(column)
            for node in conversion.float_nodes:
                floats.add_row(node.name, node.op_type, node.reason)
            stdout.print(floats)
    comparison = result.comparison
    if comparison is not None:
        table = Table(
            title=f"Float vs quantized on {comparison.samples} samples", title_justify="left"
        )
        for column in ("output", "SQNR dB", "cosine", "max |err|", "top-1 agree"):
            table.add_column(column, justify="right" if column != "output" else "left")
        for out in comparison.outputs:
            agreement = "-" if out.top1_agreement is None else f"{out.top1_agreement:.2%}"
            table.add_row(
                out.name,
                _db(out.sqnr_db),
                f"{out.cosine:.5f}",
                f"{out.max_abs_error:.4g}",
                agreement,
            )
        stdout.print(table)
        if comparison.reference_accuracy is not None:
            stdout.print(
                f"accuracy: float {comparison.reference_accuracy:.2%}, "
                f"quantized {comparison.candidate_accuracy:.2%}, "
                f"drop {comparison.accuracy_drop_points:+.2f} points"
            )


def summary(path: Path, info: ModelSummary) -> None:
    """The inspect summary."""
    table = Table(title=f"qconvert inspect: {path}", title_justify="left")
    for column in ("", "name", "type", "shape"):
        table.add_column(column)
    for kind, tensors in (("input", info.inputs), ("output", info.outputs)):
        for tensor in tensors:
            shape = "?" if tensor.shape is None else "x".join(str(d) for d in tensor.shape)
            table.add_row(kind, tensor.name, tensor.dtype, shape)
    stdout.print(table)
    opsets = ", ".join(f"{domain} {version}" for domain, version in info.opsets.items())
    stdout.print(f"opsets: {opsets}")
    stdout.print(f"parameters: {info.parameters:,} ({_bytes(info.parameter_bytes)})")
    ops = Table(title="Ops", title_justify="left")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in info.op_histogram.items():
        ops.add_row(op, str(count))
    stdout.print(ops)
    names = ", ".join(info.quantizable_nodes) or "none"
    stdout.print(f"int8 would quantize {len(info.quantizable_nodes)} nodes: {names}")


def _bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def _db(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2f}"
