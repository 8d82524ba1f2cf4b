"""Rich renderings of reports and summaries for the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from qconvert import formatting as fmt
from qconvert.cli._console import stdout
from qconvert.inspection import ModelSummary
from qconvert.report import Report

if TYPE_CHECKING:
    from qconvert.compare import Comparison


def report(result: Report) -> None:
    """The quantize report: sizes, quantized ops, float nodes, accuracy."""
    conversion = result.conversion
    if conversion is not None:
        table = Table(title=f"qconvert {result.command}: {result.model}", title_justify="left")
        table.add_column("")
        table.add_column("value", justify="right")
        for what, value in fmt.conversion_rows(conversion, result.output):
            table.add_row(what, value)
        audit = conversion.fusion_audit
        stdout.print(table)
        if audit is not None and (audit.islands or audit.lost):
            islands = Table(
                title="Float islands (DequantizeLinear -> op -> QuantizeLinear)",
                title_justify="left",
            )
            for column in ("node", "op", "plan", "reason"):
                islands.add_column(column)
            for row in fmt.island_rows(audit):
                islands.add_row(*row)
            stdout.print(islands)
        for note in conversion.notes:
            stdout.print(f"note: {note}")
        for heading, lines in (
            ("finished", conversion.finished),
            ("kept", conversion.kept),
            ("refused", conversion.refused),
        ):
            for line in lines:
                stdout.print(f"{heading}: {line}")
        if conversion.float_nodes:
            floats = Table(title="Nodes left float", title_justify="left")
            for column in ("nodes", "op", "reason"):
                floats.add_column(column)
            for row in fmt.float_node_groups(conversion.float_nodes):
                floats.add_row(*row)
            stdout.print(floats)
    if result.comparison is not None:
        _comparison(result.comparison)
    if result.gates:
        _gates(result)


def _comparison(comparison: Comparison) -> None:
    table = Table(
        title=f"Reference vs candidate on {comparison.samples} samples", title_justify="left"
    )
    for column in ("", "reference", "candidate", "candidate / reference"):
        table.add_column(column, justify="left" if not column else "right")
    for row in fmt.comparison_rows(comparison):
        table.add_row(*row)
    stdout.print(table)
    outputs = Table(title="Outputs", title_justify="left")
    columns = ("output", "SQNR dB", "cosine", "max |err|", "mean |err|", "rel err")
    for column in (*columns, "top-1 agree", "top-5 overlap"):
        outputs.add_column(column, justify="left" if column == "output" else "right")
    for row in fmt.output_rows(comparison):
        outputs.add_row(*row)
    stdout.print(outputs)
    if comparison.layers is not None:
        layers = Table(title="Layers, worst local SQNR first", title_justify="left")
        columns = ("node", "op", "tensor", "local SQNR dB", "SQNR dB", "cosine", "max |err|")
        for column in columns:
            layers.add_column(column, justify="left" if column in columns[:3] else "right")
        for layer in comparison.layers:
            layers.add_row(
                layer.node,
                layer.op_type,
                layer.candidate_tensor,
                *fmt.layer_error_cells(layer),
            )
        stdout.print(layers)


def _gates(result: Report) -> None:
    table = Table(title="Gates", title_justify="left")
    for column in ("gate", "threshold", "measured", "result"):
        table.add_column(column, justify="left" if column == "gate" else "right")
    for gate in result.gates:
        table.add_row(
            gate.gate,
            fmt.number(gate.threshold),
            "not measured" if gate.measured is None else fmt.number(gate.measured),
            "pass" if gate.passed else "FAIL",
            style=None if gate.passed else "bold red",
        )
    stdout.print(table)


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
    stdout.print(f"parameters: {info.parameters:,} ({fmt.size(info.parameter_bytes)})")
    ops = Table(title="Ops", title_justify="left")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in info.op_histogram.items():
        ops.add_row(op, str(count))
    stdout.print(ops)
    names = ", ".join(info.quantizable_nodes) or "none"
    stdout.print(f"int8 would quantize {len(info.quantizable_nodes)} nodes: {names}")
