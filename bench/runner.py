"""Runs the bench: for each case and each scheme, ours and theirs side by side.

A scheme runs when both tools offer it; where qconvert does not offer it yet the row says so
(and the peer is not run: the comparison is the point). New schemes slot into `VARIANTS`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from bench import audit, data, measure, steps
from bench.cases import Case

log = logging.getLogger("bench")


@dataclass(frozen=True, slots=True, kw_only=True)
class Variant:
    """One scheme: qconvert's (scheme, format) and the peer step that does the same."""

    scheme: str
    ours: tuple[str, str]
    theirs_label: str | None
    theirs_step: str | None = None  # a function name in bench.steps
    theirs_options: dict = field(default_factory=dict)
    ours_options: dict = field(default_factory=dict)  # QuantizeConfig fields: the flags
    groups: tuple[str, ...] | None = None  # case groups it runs on; None: all


VARIANTS = (
    Variant(
        scheme="int8",
        ours=("int8", "qdq"),
        theirs_label="quantize_static QDQ, u8 act, s8 per-channel weights, MinMax",
        theirs_step="ort_static",
    ),
    Variant(
        scheme="int8-qop",
        ours=("int8", "qop"),
        theirs_label="quantize_static QOperator, u8/s8 per-channel, MinMax",
        theirs_step="ort_static",
        theirs_options={"fmt": "qop"},
    ),
    Variant(
        scheme="16x8",
        ours=("16x8", "qdq"),
        theirs_label="quantize_static QDQ, s16 act, s8 per-channel weights, MinMax",
        theirs_step="ort_static",
        theirs_options={"activation": "QInt16"},
    ),
    Variant(
        scheme="int8-dynamic",
        ours=("int8-dynamic", "qdq"),
        theirs_label="quantize_dynamic, s8 weights",
        theirs_step="ort_dynamic",
    ),
    Variant(
        scheme="fp16",
        ours=("fp16", "qdq"),
        theirs_label="onnxconverter-common float16, keep_io_types",
        theirs_step="occ_float16",
    ),
    Variant(scheme="fp16-weights", ours=("fp16-weights", "qdq"), theirs_label=None),
    # int4 (issue 19): block 32, symmetric, embeddings too, MatMulNBits accuracy_level 4
    Variant(
        scheme="int4",
        ours=("int4", "qop"),
        theirs_label="matmul_nbits_quantizer RTN, block 32, symmetric, MatMul+Gather",
        theirs_step="ort_int4",
        ours_options={"quantize_embeddings": True, "with_data": False},
    ),
    Variant(
        scheme="int4+data",
        ours=("int4", "qop"),
        theirs_label="matmul_nbits_quantizer RTN, block 32, symmetric, MatMul+Gather",
        theirs_step="ort_int4",
        ours_options={"quantize_embeddings": True},
    ),
    Variant(
        scheme="int4-b128",
        ours=("int4", "qop"),
        theirs_label="matmul_nbits_quantizer RTN, block 128, symmetric, MatMul+Gather",
        theirs_step="ort_int4",
        theirs_options={"block_size": 128},
        ours_options={"quantize_embeddings": True, "with_data": False, "block_size": 128},
    ),
    # onnxruntime's GPTQ and HQQ int4 at block 32 (bench/int4_peer_step.py, in the Quark
    # environment for their torch), each beside the qconvert row it answers: GPTQ reads the
    # samples as --data does; HQQ is data-free. On the real models only (GPTQ takes minutes).
    Variant(
        scheme="int4+data-gptq",
        ours=("int4", "qop"),
        theirs_label="matmul_nbits_quantizer GPTQ, block 32, symmetric, MatMul, accuracy 4",
        theirs_step="ort_int4_torch",
        theirs_options={"algo": "gptq"},
        ours_options={"quantize_embeddings": True},
        groups=("real",),
    ),
    Variant(
        scheme="int4-hqq",
        ours=("int4", "qop"),
        theirs_label="matmul_nbits_quantizer HQQ, block 32, asymmetric (float zero points), "
        "MatMul, float compute",
        theirs_step="ort_int4_torch",
        theirs_options={"algo": "hqq"},
        ours_options={"quantize_embeddings": True, "with_data": False},
        groups=("real",),
    ),
    # --int4-kernel nbits with data: MatMulNBits, against int4+data's default int8 kernel
    # (issue 19's latency target), beside the peer's RTN at accuracy_level 4.
    Variant(
        scheme="int4+data-nbits",
        ours=("int4", "qop"),
        theirs_label="matmul_nbits_quantizer RTN, block 32, symmetric, MatMul+Gather",
        theirs_step="ort_int4",
        ours_options={"quantize_embeddings": True, "int4_kernel": "nbits"},
    ),
    # --size-budget 0: every layer at 4 bits, against int4+data's default budget (17%)
    Variant(
        scheme="int4+data-no-budget",
        ours=("int4", "qop"),
        theirs_label=None,
        ours_options={"quantize_embeddings": True, "size_budget": 0.0},
        groups=("real",),
    ),
    Variant(
        scheme="int4+scale-search",
        ours=("int4", "qop"),
        theirs_label=None,
        ours_options={"quantize_embeddings": True, "with_data": False, "scale_search": True},
    ),
    # `--recipe fast`: the single pass, against the default recipe's wall time (issue 16).
    Variant(
        scheme="int8-fast",
        ours=("int8", "qdq"),
        theirs_label=None,
        ours_options={"recipe": "fast"},
    ),
    # The accuracy flags, each measured against the plain int8 row above.
    Variant(
        scheme="int8+bias-correction",
        ours=("int8", "qdq"),
        theirs_label=None,
        ours_options={"bias_correction": True},
    ),
    Variant(
        scheme="int8+adaround",
        ours=("int8", "qdq"),
        theirs_label=None,
        ours_options={"adaround": True},
    ),
    Variant(
        scheme="int8+equalize",
        ours=("int8", "qdq"),
        theirs_label=None,
        ours_options={"equalize": True},
    ),
    Variant(
        scheme="int8+smooth-quant",
        ours=("int8", "qdq"),
        theirs_label=None,
        ours_options={"smooth_quant": 0.5},
    ),
    # The second peer, AMD Quark (bench/quark_step.py), against qconvert's default int8: on
    # the real and sample models only (its best recipe takes minutes a model).
    Variant(
        scheme="int8-quark",
        ours=("int8", "qdq"),
        theirs_label="AMD Quark default: u8 act, s8 per-channel weights, Percentile",
        theirs_step="quark_quantize",
        theirs_options={"recipe": "default"},
        groups=("real", "sample", "user"),
    ),
    Variant(
        scheme="int8-quark-best",
        ours=("int8", "qdq"),
        theirs_label="AMD Quark best CPU recipe: as default + CLE + AdaRound (100 iterations)",
        theirs_step="quark_quantize",
        theirs_options={"recipe": "best"},
        groups=("real", "sample", "user"),
    ),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    latency: measure.LatencyPlan
    thread_settings: tuple[int, ...] = (1, 0)
    step_timeout_s: float = 900.0


def weight_bytes(model: Path) -> int:
    """Bytes of float32 weights: initializers, and tensors of Constant nodes (as some
    exporters write every weight; PP-OCRv4's DBNet holds its 4.7 MB that way)."""
    proto = onnx.load(model, load_external_data=False)
    tensors = list(proto.graph.initializer)
    tensors += [
        attribute.t
        for node in proto.graph.node
        if node.op_type == "Constant"
        for attribute in node.attribute
        if attribute.name == "value"
    ]
    return sum(int(np.prod(t.dims)) * 4 for t in tensors if t.data_type == 1)


def bench_case(case: Case, variants, settings: Settings, work: Path, index: int) -> list[dict]:
    """All rows of one case: one per variant."""
    proto = onnx.load(case.model, load_external_data=False)
    initializers = {t.name for t in proto.graph.initializer}
    ranks = {
        i.name: len(i.type.tensor_type.shape.dim)
        for i in proto.graph.input
        if i.name not in initializers
    }
    names = [o.name for o in proto.graph.output]
    eval_samples = data.read_folder(case.eval, ranks)
    labels = data.read_labels(case.eval)
    float_outputs = measure.run_all(str(case.model), eval_samples)
    float_accuracy = (
        measure.accuracy_of(float_outputs, case.task, names, labels)
        if labels is not None
        else None
    )
    also = {
        label: (samples, measure.run_all(str(case.model), samples))
        for label, samples in (
            (label, data.read_folder(folder, ranks)) for label, folder in case.also_eval
        )
    }
    float_size = case.model.stat().st_size
    rows = []
    variants = [v for v in variants if v.groups is None or case.group in v.groups]
    for number, variant in enumerate(variants):
        row: dict = {
            "model": case.name,
            "group": case.group,
            "scheme": variant.scheme,
            "theirs": variant.theirs_label,
            "float_bytes": float_size,
            "float_weight_bytes": weight_bytes(case.model),
            "float_accuracy": float_accuracy,
        }
        if case.task == "segment":
            row["float_mask_share"] = round(
                measure.mask_share(case.task, names, float_outputs), 4
            )
        folder = work / "out" / case.name
        folder.mkdir(parents=True, exist_ok=True)
        ours_path = folder / f"{variant.scheme}.qconvert.onnx"
        theirs_path = folder / f"{variant.scheme}.peer.onnx"
        for stale in (ours_path, theirs_path):
            stale.unlink(missing_ok=True)
        reason = steps.qconvert_supports(*variant.ours)
        if reason is not None:
            row["status"] = reason
            rows.append(row)
            continue
        paths = {"ours": ours_path, "theirs": theirs_path}
        jobs = {
            "ours": (
                steps.qconvert_quantize,
                {"scheme": variant.ours[0], "fmt": variant.ours[1], **variant.ours_options},
            ),
        }
        if variant.theirs_step is not None:
            jobs["theirs"] = (getattr(steps, variant.theirs_step), variant.theirs_options)
        order = list(jobs) if (index + number) % 2 == 0 else list(jobs)[::-1]
        results = {}
        for tool in order:
            log.info("  %s %s: %s", case.name, variant.scheme, tool)
            step, options = jobs[tool]
            results[tool] = steps.run_in_child(
                step,
                settings.step_timeout_s,
                model=str(case.model),
                data=str(case.calib),
                output=str(paths[tool]),
                **options,
            )
        runnable = {}
        for tool, result in results.items():
            row[f"{tool}_step"] = asdict(result)
            if result.ok and paths[tool].exists():
                row[f"{tool}_size_ratio"] = round(paths[tool].stat().st_size / float_size, 4)
                runnable[tool] = str(paths[tool])
        if variant.scheme == "int8":
            for tool, path in runnable.items():
                try:
                    row[f"{tool}_audit"] = audit.audit(path, Path(path + ".report.json"))
                except Exception as exc:  # noqa: BLE001 - an audit that fails is a result
                    row[f"{tool}_audit_error"] = measure._one_line(exc)
        for tool, path in runnable.items():
            try:
                outputs = measure.run_all(path, eval_samples)
            except Exception as exc:  # noqa: BLE001 - a model that does not run is a result
                row[f"{tool}_run_error"] = measure._one_line(exc)
                continue
            fid = measure.fidelity(case.task, names, float_outputs, outputs, labels)
            row[f"{tool}_fidelity"] = asdict(fid)
            for label, (samples, reference) in also.items():
                fid = measure.fidelity(
                    case.task, names, reference, measure.run_all(path, samples), None
                )
                scores = row.setdefault("also_fidelity", {})
                scores.setdefault(label, {"samples": len(samples)})[tool] = asdict(fid)
        timed = {
            "float": str(case.model),
            **{t: p for t, p in runnable.items() if f"{t}_run_error" not in row},
        }
        for threads in settings.thread_settings:
            key = "1t" if threads == 1 else "all"
            lat = measure.latencies_ms(timed, eval_samples[0], threads, settings.latency)
            row[f"latency_{key}"] = lat
            if isinstance(lat.get("ours"), float) and isinstance(lat.get("theirs"), float):
                row[f"latency_{key}_ours_over_theirs"] = round(lat["ours"] / lat["theirs"], 3)
            for tool in ("ours", "theirs"):
                if isinstance(lat.get(tool), float):
                    row[f"latency_{key}_{tool}_over_float"] = round(
                        lat[tool] / lat["float"], 3
                    )
        row["status"] = _status(row)
        rows.append(row)
    return rows


def _status(row: dict) -> str:
    problems = []
    tools = ("ours", "theirs") if row["theirs"] is not None else ("ours",)
    for tool in tools:
        step = row.get(f"{tool}_step", {})
        if not step.get("ok"):
            problems.append(f"{tool} failed: {step.get('error')}")
        elif f"{tool}_run_error" in row:
            problems.append(f"{tool} does not run: {row[f'{tool}_run_error']}")
        else:
            for key in ("latency_1t", "latency_all"):
                value = row.get(key, {}).get(tool)
                if isinstance(value, str):
                    problems.append(f"{tool}: {value}")
                    break
    if problems:
        return "; ".join(problems)
    return "ok" if row["theirs"] is not None else "ok (no peer for this scheme)"


# --- calibration scaling ----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ScalingPlan:
    """Which model to calibrate at which sample counts; tools whose memory grows with the
    count (the peer's histogram calibrators) can be capped to keep the machine alive."""

    model: str
    sizes: tuple[int, ...]
    tools: tuple[str, ...]
    caps: dict[str, int] = field(default_factory=dict)  # tool -> largest sample count
    repeats: int = 1  # runs per tool and count: the median time and the median peak kept
    # The counts run `repeats` times (None: every count); the others run once.
    repeated_sizes: tuple[int, ...] | None = None


def scaling(case: Case, plan: ScalingPlan, work: Path, timeout_s: float) -> list[dict]:
    """Calibration time and peak memory per tool at each sample count, plus a float pass."""
    sizes, tools = plan.sizes, plan.tools
    proto = onnx.load(case.model, load_external_data=False)
    initializers = {t.name for t in proto.graph.initializer}
    ranks = {
        i.name: len(i.type.tensor_type.shape.dim)
        for i in proto.graph.input
        if i.name not in initializers
    }
    base = data.read_folder(case.calib, ranks)
    rng = np.random.default_rng(7)
    rows = []
    for count in sizes:
        folder = work / "scaling" / case.name / str(count)
        samples = []
        for i in range(count):
            feeds = base[i % len(base)]
            if i >= len(base):  # more samples than the folder holds: jittered copies
                feeds = {
                    k: (v + rng.normal(0, 0.02, v.shape).astype(v.dtype))
                    if v.dtype.kind == "f"
                    else v
                    for k, v in feeds.items()
                }
            samples.append(feeds)
        data.write_folder(folder, samples)
        for tool in tools:
            if count > plan.caps.get(tool, count):
                rows.append(
                    {
                        "model": case.name,
                        "samples": count,
                        "tool": tool,
                        "ok": False,
                        "error": f"skipped above {plan.caps[tool]} samples (memory)",
                    }
                )
                continue
            out = work / "scaling" / f"{case.name}.{tool}.out"
            out.unlink(missing_ok=True)
            log.info("  scaling %s n=%d: %s", case.name, count, tool)
            step, options = SCALING_TOOLS[tool]
            runs = []
            repeats = (
                plan.repeats
                if plan.repeated_sizes is None or count in plan.repeated_sizes
                else 1
            )
            for _ in range(repeats):
                out.unlink(missing_ok=True)
                runs.append(
                    steps.run_in_child(
                        getattr(steps, step),
                        timeout_s,
                        model=str(case.model),
                        data=str(folder),
                        output=str(out),
                        **options,
                    )
                )
            result = median_run(runs)
            rows.append(
                {
                    "model": case.name,
                    "samples": count,
                    "tool": tool,
                    "runs": len(runs),
                    **asdict(result),
                }
            )
    return rows


def median_run(runs: list[steps.StepResult]) -> steps.StepResult:
    """The run with the median time among those that finished, carrying their median peak.

    One process's peak moves with where its concurrent runs' tensors land in onnxruntime's
    shared arena (186-228 MB for the same calibration of a 320x320 text detector over 18
    processes), as much as a 10% growth target: the median of the peaks, not the peak of
    the median-time run, is what a run of this code typically holds.
    """
    done = sorted((r for r in runs if r.ok), key=lambda r: r.seconds)
    if not done:
        return runs[0]
    middle = done[len(done) // 2]
    peaks = sorted(r.peak_mb for r in done if r.peak_mb is not None)
    return replace(middle, peak_mb=peaks[len(peaks) // 2] if peaks else middle.peak_mb)


SCALING_TOOLS = {
    "float pass": ("float_pass", {}),
    "qconvert": ("qconvert_calibrate", {}),
    "qconvert quantize stage": ("qconvert_quantize_stage", {}),
    **{
        f"qconvert {method}": ("qconvert_method", {"method": method})
        for method in ("minmax", "percentile", "entropy", "mse")
    },
    "ort MinMax": ("ort_static", {"method": "MinMax"}),
    "ort Percentile": ("ort_static", {"method": "Percentile"}),
}
