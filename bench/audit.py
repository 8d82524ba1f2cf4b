"""The fusion audit of each tool's int8 model: integer kernels and float islands.

The optimized graph comes from onnxruntime's CPU provider at its run-time level
(`ORT_ENABLE_ALL`), as `qconvert.fusion_audit` reads it. qconvert's own islands carry its
plan's word (planned or not) from the report it wrote beside the model; the peer has no plan,
so its islands are only counted.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort


def audit(model: str, report: Path | None = None) -> dict:
    """Integer kernels, islands by op, and (qconvert) unplanned islands of `model`."""
    from qconvert.fusion_audit import audit_graph

    with tempfile.TemporaryDirectory(prefix="bench-audit-") as folder:
        path = Path(folder) / "optimized.onnx"
        options = ort.SessionOptions()
        options.log_severity_level = 4
        options.optimized_model_filepath = str(path)
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "weights.bin"
        )
        ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        found = audit_graph(onnx.load(str(path), load_external_data=False).graph)
    summary = {
        "kernels": found.kernel_count,
        "integer_kernels": found.integer_kernels,
        "islands": len(found.islands),
        "islands_by_op": found.islands_by_op(),
        "nodes": found.nodes,
        "unplanned": None,
    }
    if report is not None and report.exists():
        written = (json.loads(report.read_text()).get("conversion") or {}).get("fusion_audit")
        if written is not None:
            summary["unplanned"] = written["unplanned_islands"]
            summary["unplanned_by_op"] = _unplanned_by_op(written)
    return summary


def _unplanned_by_op(written: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for island in written["islands"]:
        if not island["planned"]:
            for node in island["nodes"]:
                counts[node["op_type"]] = counts.get(node["op_type"], 0) + 1
    return dict(sorted(counts.items()))


def markdown(rows: list[dict]) -> list[str]:
    """One line per model of the int8 rows: kernels and islands, ours and the peer's."""
    lines = [
        "| model | integer kernels: ours / theirs | float islands: ours / theirs"
        " | ours: islands by op (unplanned) | theirs: islands by op | nodes: ours / theirs |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        ours, theirs = row.get("ours_audit"), row.get("theirs_audit")
        if ours is None and theirs is None:
            continue
        ours, theirs = ours or {}, theirs or {}
        unplanned = ours.get("unplanned")
        lines.append(
            f"| {row['model']} | {ours.get('kernels', '—')} / {theirs.get('kernels', '—')} "
            f"| {ours.get('islands', '—')} / {theirs.get('islands', '—')} "
            f"| {_ops(ours.get('islands_by_op'))}"
            + (
                f" ({unplanned} unplanned: {_ops(ours.get('unplanned_by_op'))})"
                if unplanned
                else ""
            )
            + f" | {_ops(theirs.get('islands_by_op'))} "
            f"| {ours.get('nodes', '—')} / {theirs.get('nodes', '—')} |"
        )
    return lines


def _ops(counts: dict | None) -> str:
    if counts is None:
        return "—"
    return ", ".join(f"{op} x{n}" for op, n in counts.items()) or "none"
