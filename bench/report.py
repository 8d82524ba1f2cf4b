"""results.json -> results.md: the main table, calibration scaling, the issues' targets."""

from __future__ import annotations

from bench import audit, large_decoder, parallel
from bench.runner import VARIANTS
from bench.targets import evaluate_targets


def _num(value, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return "fail"
    return f"{value:.{digits}f}{suffix}"


def _pair(a, b, digits: int = 2, suffix: str = "") -> str:
    return f"{_num(a, digits, suffix)} / {_num(b, digits, suffix)}"


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def main_table(rows: list[dict]) -> list[str]:
    lines = [
        "| model | scheme | size vs float: ours / theirs"
        " | latency 1 thread ms: float / ours / theirs"
        " | ours÷theirs 1T | latency all threads ms: float / ours / theirs | ours÷theirs all"
        " | accuracy: float / ours / theirs | agreement: ours / theirs"
        " | SQNR dB: ours / theirs"
        " | quantize s: ours / theirs | peak MB: ours / theirs | status |",
        "|" + "---|" * 13,
    ]
    for row in rows:
        if "ours_step" not in row:
            lines.append(
                f"| {row['model']} | {row['scheme']} |" + " — |" * 10 + f" {row['status']} |"
            )
            continue
        fid = {t: row.get(f"{t}_fidelity") or {} for t in ("ours", "theirs")}
        step = {t: row.get(f"{t}_step") or {} for t in ("ours", "theirs")}
        lat1, latn = row.get("latency_1t", {}), row.get("latency_all", {})
        kind = fid["ours"].get("agreement_kind") or fid["theirs"].get("agreement_kind") or ""
        acc = "—"
        if row.get("float_accuracy") is not None:
            acc = " / ".join(
                _pct(v)
                for v in (
                    row["float_accuracy"],
                    fid["ours"].get("accuracy"),
                    fid["theirs"].get("accuracy"),
                )
            )
        lines.append(
            f"| {row['model']} | {row['scheme']} "
            f"| {_pct(row.get('ours_size_ratio'))} / {_pct(row.get('theirs_size_ratio'))} "
            f"| {_num(lat1.get('float'))} / {_num(lat1.get('ours'))} "
            f"/ {_num(lat1.get('theirs'))} "
            f"| {_num(row.get('latency_1t_ours_over_theirs'), 2, '×')} "
            f"| {_num(latn.get('float'))} / {_num(latn.get('ours'))} "
            f"/ {_num(latn.get('theirs'))} "
            f"| {_num(row.get('latency_all_ours_over_theirs'), 2, '×')} "
            f"| {acc} "
            f"| {_pair(fid['ours'].get('agreement'), fid['theirs'].get('agreement'), 3)} "
            f"{_short(kind)} "
            f"| {_pair(fid['ours'].get('sqnr_db'), fid['theirs'].get('sqnr_db'), 1)} "
            f"| {_pair(step['ours'].get('seconds'), step['theirs'].get('seconds'), 1)} "
            f"| {_pair(step['ours'].get('peak_mb'), step['theirs'].get('peak_mb'), 0)} "
            f"| {_short_status(row['status'])} |"
        )
    return lines


def also_table(rows: list[dict]) -> list[str]:
    """The second eval sets of the models that have them: the same written models scored
    on other inputs, so a figure's dependence on its eval set stays in sight."""
    lines = [
        "| model | scheme | eval set | samples | agreement: ours / theirs"
        " | SQNR dB: ours / theirs |",
        "|---|---|---|---:|---|---|",
    ]
    for row in rows:
        for label, fids in (row.get("also_fidelity") or {}).items():
            ours, theirs = fids.get("ours") or {}, fids.get("theirs") or {}
            kind = ours.get("agreement_kind") or theirs.get("agreement_kind") or ""
            lines.append(
                f"| {row['model']} | {row['scheme']} | {label} | {fids.get('samples', '—')} "
                f"| {_pair(ours.get('agreement'), theirs.get('agreement'), 3)} {_short(kind)} "
                f"| {_pair(ours.get('sqnr_db'), theirs.get('sqnr_db'), 1)} |"
            )
    return lines if len(lines) > 2 else ["- none in this run"]


def _short_status(status: str) -> str:
    return (
        status
        if status == "ok" or "not supported" in status or "no peer" in status
        else "failed, see below"
    )


def failures(rows: list[dict]) -> list[str]:
    out = [
        f"- {row['model']} / {row['scheme']}: {row['status']}"
        for row in rows
        if _short_status(row["status"]) == "failed, see below"
    ]
    return out or ["- none"]


def summary(rows: list[dict]) -> list[str]:
    """Ratios only, as the README quotes them: one line per model and scheme that ran."""
    lines = [
        "| model | scheme | size vs float: ours / theirs | latency 1T ours÷theirs | latency 1T"
        " ours÷float | latency all ours÷theirs | agreement ours / theirs"
        " | SQNR dB ours / theirs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "ours_step" not in row:
            continue
        fid = {t: row.get(f"{t}_fidelity") or {} for t in ("ours", "theirs")}
        kind = fid["ours"].get("agreement_kind") or fid["theirs"].get("agreement_kind") or ""
        lines.append(
            f"| {row['model']} | {row['scheme']} "
            f"| {_pct(row.get('ours_size_ratio'))} / {_pct(row.get('theirs_size_ratio'))} "
            f"| {_num(row.get('latency_1t_ours_over_theirs'), 2, '×')} "
            f"| {_num(row.get('latency_1t_ours_over_float'), 2, '×')} "
            f"| {_num(row.get('latency_all_ours_over_theirs'), 2, '×')} "
            f"| {_pair(fid['ours'].get('agreement'), fid['theirs'].get('agreement'), 3)} "
            f"{_short(kind)} "
            f"| {_pair(fid['ours'].get('sqnr_db'), fid['theirs'].get('sqnr_db'), 1)} |"
        )
    return lines


def _short(kind: str) -> str:
    return {
        "top-1 agreement": "(top-1)",
        "mean cosine": "(cosine)",
    }.get(kind, f"({kind})" if kind else "")


def scaling_table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(not run)"]
    floats = {
        (r["model"], r["samples"]): r.get("seconds")
        for r in rows
        if r["tool"] == "float pass" and r["ok"]
    }
    lines = [
        "| model | samples | tool | seconds | ÷ float pass | calibrate stage s"
        " | stage ÷ float pass"
        " | peak MB | note |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        base = floats.get((r["model"], r["samples"]))
        ratio = r.get("seconds") / base if r.get("seconds") and base else None
        stage = r.get("stage_seconds")
        stage_ratio = stage / base if stage and base else None
        note = r.get("note") or r.get("error") or ""
        lines.append(
            f"| {r['model']} | {r['samples']} | {r['tool']} | {_num(r.get('seconds'))} "
            f"| {_num(ratio, 2, '×')} | {_num(stage)} | {_num(stage_ratio, 2, '×')} "
            f"| {_num(r.get('peak_mb'), 0)} | {note} |"
        )
    return lines


def markdown(results: dict) -> str:
    meta = results["meta"]
    out = [
        "# qconvert bench results",
        "",
        f"Run {meta['date']} on {meta['machine']}; Python {meta['python']}, onnxruntime "
        f"{meta['onnxruntime']}, qconvert {meta['qconvert']}; {meta['bench_seconds']} s in all"
        + (" (--quick)" if meta.get("quick") else "")
        + ".",
        "",
        "*ours* = qconvert, *theirs* = onnxruntime.quantization (quantize_static /"
        " quantize_dynamic), onnxconverter-common (fp16) or AMD Quark's ONNX quantizer (rows"
        " int8-quark, int8-quark-best, run in its own environment), on the same calibration"
        " files."
        " Latency: onnxruntime CPU, batch 1, thread-pool spinning off, median of runs taken"
        " in alternation"
        f" ({meta['latency_plan']}). Quantize time and peak memory (the child's peak"
        " resident set, VmHWM, interpreter and onnxruntime included) are of each tool's"
        " calibrate+quantize step in a fresh"
        " child process. Agreement and SQNR are against the float model on the eval samples.",
        "",
        "## Side by side",
        "",
        *main_table(results["rows"]),
        "",
        "Peers (*theirs*) per scheme: "
        + "; ".join(f"{v.scheme}: {v.theirs_label or 'none'}" for v in VARIANTS)
        + ". The peer runs with its defaults otherwise (no quant_pre_process).",
        "",
        "### Second eval sets",
        "",
        *also_table(results["rows"]),
        "",
        "### Variants that failed",
        "",
        *failures(results["rows"]),
        "",
        "### Ratios (what the README quotes)",
        "",
        *summary(results["rows"]),
        "",
        "## Calibration scaling",
        "",
        *scaling_table(results["scaling"]),
        "",
        "## Parallel calibration",
        "",
        *parallel.markdown(results.get("parallel")),
        "",
        "## int4 on a 3 GB decoder (issue 19)",
        "",
        *large_decoder.markdown(results.get("large_decoder")),
        "",
        "## Fusion audit (int8)",
        "",
        "What onnxruntime's CPU provider runs of each int8 model (`qconvert.fusion_audit`):"
        " integer kernels, and float islands (DequantizeLinear -> float op ->"
        " QuantizeLinear), counted by op; *unplanned* islands are ones qconvert's plan"
        " meant as integer kernels.",
        "",
        *audit.markdown([r for r in results["rows"] if r["scheme"] == "int8"]),
        "",
        "## Targets from the issues",
        "",
        "| issue | target | measured | verdict |",
        "|---|---|---|---|",
        *(
            f"| {t['issue']} | {t['target']} | {t['measured']} | {t['verdict']} |"
            for t in evaluate_targets(results)
        ),
        "",
        "## Models",
        "",
        "| model | group | task | calib / eval samples | what |",
        "|---|---|---|---|---|",
        *(
            f"| {m['name']} | {m['group']} | {m['task']} "
            f"| {m['calib_samples']} / {m['eval_samples']} | {m['about']} |"
            for m in results["models"]
        ),
        "",
    ]
    if results.get("notes"):
        out += ["## Notes", "", *(f"- {n}" for n in results["notes"]), ""]
    return "\n".join(out)
