"""The targets the calibration and quantizer issues state, checked against one run's figures.

Each target reads ratios measured in the same run; a target whose figures are missing (the
scheme or method is not in qconvert yet, a model was not run) is "not measurable yet".
"""

from __future__ import annotations

from bench import accuracy_targets, large_decoder, parallel

CNN_224 = ("resnet_style_224", "mobilenetv2_style_224")
CNNS = (
    *CNN_224,
    "efficientnet_lite_style_224",
    "efficientnet_lite0",
    "digits_cnn",
    "digits_dwsep",
    "ppocr_cls",
    "ppocr_det_dbnet",
    "nudenet_yolov8n",
)
"""The convolutional bench models (issue 18: int8 at most half the float latency)."""
# What each range method costs a user of `quantize --data` (issue 4: "the histogram
# methods add < 20% on top of minmax"); minmax calibrates without histograms.
METHOD_TOOLS = ("qconvert minmax", "qconvert percentile", "qconvert entropy", "qconvert mse")
ONE_MB = 1 << 20
# Issue 18: `qconvert calibrate`, and the calibration stage of `quantize --data`.
CALIBRATION_TOOLS = ("qconvert", "qconvert quantize stage")
CALIBRATION_TIME = 1.5  # x one float pass's wall time over the same samples
CALIBRATION_MEMORY = 2.0  # x one float pass's peak RSS
FLAT = 0.10  # "flat from 64 to 1,024 samples": the peak grows less than this


def _verdict(ok: bool | str | None) -> str:
    """met / NOT met / not measurable yet (figures missing), or a reason as given (a
    target that does not apply to the model)."""
    if isinstance(ok, str):
        return ok
    return {True: "met", False: "NOT met", None: "not measurable yet"}[ok]


def _rows(results: dict, scheme: str) -> list[dict]:
    return [r for r in results["rows"] if r["scheme"] == scheme and "ours_step" in r]


def evaluate_targets(results: dict) -> list[dict]:
    targets = []

    def add(issue: str, target: str, measured: str, ok: bool | str | None) -> None:
        targets.append(
            {
                "issue": issue,
                "target": target,
                "measured": measured or "—",
                "verdict": _verdict(ok),
            }
        )

    # issue 4: calibration
    scaling = results.get("scaling", [])
    for model in dict.fromkeys(r["model"] for r in scaling):
        ours = {
            r["samples"]: r
            for r in scaling
            if r["model"] == model and r["tool"] == "qconvert" and r["ok"]
        }
        floats = {
            r["samples"]: r
            for r in scaling
            if r["model"] == model and r["tool"] == "float pass" and r["ok"]
        }
        if not ours:
            add("4", f"calibration scaling ({model})", "qconvert did not run", False)
            continue
        lo, hi = min(ours), max(ours)
        growth = ours[hi]["peak_mb"] / ours[lo]["peak_mb"] - 1
        if model == "digits_dwsep" or (lo, hi) != (64, 1024):
            add(
                "4",
                f"calibrate peak memory grows < 10% from {lo} to {hi} samples ({model})",
                f"{100 * growth:+.1f}%",
                growth < 0.10 if (lo, hi) == (64, 1024) else None,
            )
        ratios = {
            n: ours[n]["stage_seconds"] / floats[n]["seconds"]
            for n in ours
            if n in floats and ours[n].get("stage_seconds")
        }
        whole = all((r.get("note") or "").startswith("api.calibrate") for r in ours.values())
        add(
            "4",
            f"calibration wall time ≤ 1.25× one float pass over the same samples ({model})",
            ", ".join(f"{r:.2f}× at {n}" for n, r in ratios.items())
            + (
                ""
                if whole
                else " (calibrate stage inside api.quantize; no api.calibrate in qconvert yet)"
            ),
            max(ratios.values()) <= 1.25 if ratios else None,
        )
    if not scaling:
        add("4", "calibration scaling", "not run", None)
    for model in dict.fromkeys(r["model"] for r in scaling):
        methods = {
            (r["tool"].removeprefix("qconvert "), r["samples"]): r["seconds"]
            for r in scaling
            if r["model"] == model and r["tool"] in METHOD_TOOLS and r["ok"]
        }
        added = {
            (method, n): seconds / methods[("minmax", n)] - 1
            for (method, n), seconds in methods.items()
            if method != "minmax" and methods.get(("minmax", n))
        }
        worst = {}
        for (method, n), extra in added.items():
            if method not in worst or extra > worst[method][0]:
                worst[method] = (extra, n)
        add(
            "4",
            "histogram methods add < 20% on top of minmax: `quantize --data --method M`, "
            f"calibrate + ranges stages, vs minmax (which skips histograms) ({model})",
            ", ".join(f"{m} {100 * e:+.0f}% (at {n})" for m, (e, n) in worst.items())
            + (" (worst over sample counts)" if worst else ""),
            max(e for e, _ in worst.values()) < 0.20 if worst else None,
        )
    if not any(r["tool"] in METHOD_TOOLS for r in scaling):
        add("4", "histogram methods add < 20% on top of minmax", "not run", None)

    _calibration_footprint(results, add)

    # issue 5: sizes
    for scheme, bound in (("int8", 0.27), ("16x8", 0.27), ("fp16", 0.51)):
        rows = [
            r
            for r in _rows(results, scheme)
            if r["float_weight_bytes"] > ONE_MB and r.get("ours_size_ratio")
        ]
        worst = max(rows, key=lambda r: r["ours_size_ratio"], default=None)
        add(
            "5",
            f"{scheme} file ≤ {100 * bound:.0f}% of float (models > 1 MB of weights)",
            f"worst {100 * worst['ours_size_ratio']:.1f}% ({worst['model']})" if worst else "",
            worst["ours_size_ratio"] <= bound if worst else None,
        )

    # issue 6: latency vs peer and float on the 224 CNNs; real models
    int8 = {r["model"]: r for r in _rows(results, "int8")}
    for name in CNN_224:
        row = int8.get(name, {})
        vs_peer = row.get("latency_1t_ours_over_theirs")
        vs_float = row.get("latency_1t_ours_over_float")
        add(
            "6",
            f"int8 1-thread latency ≤ 1.0× peer's quantize_static ({name})",
            _ratio(vs_peer),
            vs_peer <= 1.0 if vs_peer else None,
        )
        add(
            "6",
            f"int8 1-thread latency ≤ 0.55× float ({name})",
            _ratio(vs_float),
            vs_float <= 0.55 if vs_float else None,
        )
    real_rows = [r for r in results["rows"] if r["group"] == "real"]
    if real_rows:
        failing = sorted(
            {
                f"{r['model']}/{r['scheme']}"
                for r in real_rows
                if (
                    r.get("status") not in ("ok",)
                    and "ours_step" in r
                    and not (r.get("ours_step") or {}).get("ok")
                )
                or r.get("ours_run_error")
            }
        )
        unsupported = sorted({r["scheme"] for r in real_rows if "ours_step" not in r})
        add(
            "6",
            "real models: every scheme loads and runs",
            ("failing: " + ", ".join(failing) if failing else "all run")
            + (f"; not in qconvert yet: {', '.join(unsupported)}" if unsupported else ""),
            False if failing else (None if unsupported else True),
        )
        sizes = [
            r
            for r in _rows(results, "int8")
            if r["group"] == "real" and r.get("ours_size_ratio")
        ]
        small = sorted(r["model"] for r in sizes if r["float_weight_bytes"] <= ONE_MB)
        sizes = [r for r in sizes if r["float_weight_bytes"] > ONE_MB]
        worst = max(sizes, key=lambda r: r["ours_size_ratio"], default=None)
        add(
            "6",
            "real models: int8 files ≤ 30% of float (> 1 MB of weights)",
            (
                f"worst {100 * worst['ours_size_ratio']:.1f}% ({worst['model']})"
                if worst
                else ""
            )
            + (f"; ≤ 1 MB of weights, not counted: {', '.join(small)}" if small else ""),
            worst["ours_size_ratio"] <= 0.30 if worst else None,
        )

    # issue 8: accuracy beyond the peer
    for row in _rows(results, "int8"):
        if row["group"] not in ("real", "sample"):
            continue
        ours_f, theirs_f = row.get("ours_fidelity") or {}, row.get("theirs_fidelity") or {}
        a, b = ours_f.get("sqnr_db"), theirs_f.get("sqnr_db")
        if row["group"] == "real":
            add(
                "8",
                f"int8 fidelity higher than peer's static int8 ({row['model']})",
                f"SQNR {_db(a)} vs {_db(b)}",
                (a > b) if a is not None and b is not None else None,
            )
        ga, gb = ours_f.get("agreement"), theirs_f.get("agreement")
        if gb is not None and gb < 0.90:
            add(
                "8",
                f"≥ 10 points more agreement where the peer is below 90% ({row['model']})",
                f"{100 * (ga or 0):.1f}% vs {100 * gb:.1f}%",
                ga is not None and ga - gb >= 0.10,
            )
    for name in CNN_224:
        row = int8.get(name, {})
        vs_float = row.get("latency_1t_ours_over_float")
        add(
            "8",
            f"default int8 1-thread latency ≤ 0.6× float ({name})",
            _ratio(vs_float),
            vs_float <= 0.6 if vs_float else None,
        )
    dw = int8.get("digits_dwsep")
    if dw and dw.get("ours_fidelity") and dw.get("float_accuracy") is not None:
        drop = 100 * (dw["float_accuracy"] - dw["ours_fidelity"]["accuracy"])
        add(
            "8",
            "digits_dwsep int8 accuracy within 1 point of float",
            f"{drop:+.1f} points drop",
            drop <= 1.0,
        )
    else:
        add("8", "digits_dwsep int8 accuracy within 1 point of float", "", None)

    # issue 10: parallel calibration
    add("10", *parallel.target(results.get("parallel")))
    _int4_targets(results, add)

    accuracy_targets.issue16(results, add, CNNS)
    _issue18(results, add)
    return targets


def _issue18(results: dict, add) -> None:
    """Issue 18, every model of the run: latency against the peer and float, the fusion
    audit, and quantize's peak against the peer's (calibration: `_calibration_footprint`)."""
    int8 = {r["model"]: r for r in _rows(results, "int8")}
    names = [m["name"] for m in results.get("models", [])]
    for name in dict.fromkeys([*names, *int8]):
        row = int8.get(name, {})
        missing = "" if row else "missing: no int8 row in this run"
        vs_peer = row.get("latency_1t_ours_over_theirs")
        add(
            "18",
            f"int8 1-thread latency ≤ 1.0× peer's quantize_static ({name})",
            _ratio(vs_peer) or missing,
            vs_peer <= 1.0 if vs_peer else None,
        )
        if name in CNNS:
            vs_float = row.get("latency_1t_ours_over_float")
            add(
                "18",
                f"int8 1-thread latency ≤ 0.5× float, a CNN ({name})",
                _ratio(vs_float) or missing,
                vs_float <= 0.5 if vs_float else None,
            )
        found = row.get("ours_audit") or {}
        unplanned = found.get("unplanned")
        add(
            "18",
            f"fusion audit: no float island the plan did not mean ({name})",
            missing
            if not found
            else f"{found['kernels']} integer kernels, "
            f"{found['islands']} island(s), {unplanned if unplanned is not None else '?'} "
            "unplanned",
            None if unplanned is None else unplanned == 0,
        )
        ours = (row.get("ours_step") or {}).get("peak_mb")
        theirs = (row.get("theirs_step") or {}).get("peak_mb")
        add(
            "18",
            f"quantize --data peak RSS ≤ quantize_static's ({name})",
            f"{ours:.0f} MB vs {theirs:.0f} MB" if ours and theirs else missing,
            ours <= theirs if ours and theirs else None,
        )


def _int4_targets(results: dict, add) -> None:
    """Issue 19: int4 size, fidelity against the peer's RTN, GPTQ and HQQ, 1-thread latency."""
    rows = [r for r in _rows(results, "int4") if r["group"] == "real"]
    with_data = {r["model"]: r for r in _rows(results, "int4+data") if r["group"] == "real"}
    if not rows:
        add("19", "int4 rows on the real transformers", "not run", None)
    for row in rows:
        name = row["model"]
        ratio = row.get("ours_size_ratio")
        add(
            "19",
            f"int4 file ≤ 17% of float, block 32 with embeddings ({name})",
            f"{100 * ratio:.1f}%" if ratio else "",
            ratio <= 0.17 if ratio else None,
        )
        ours, theirs = row.get("ours_fidelity") or {}, row.get("theirs_fidelity") or {}
        a, b = ours.get("agreement"), theirs.get("agreement")
        add(
            "19",
            f"int4 without data at least equal to the peer's RTN ({name})",
            f"{_agreement(ours)} vs {_agreement(theirs)}",
            a >= b - 1e-4 if a is not None and b is not None else None,
        )
        ratio = with_data.get(name, {}).get("ours_size_ratio")
        add(
            "19",
            f"int4 --data file (layers kept at 8 bits by --size-budget) ≤ 17% of float "
            f"({name})",
            f"{100 * ratio:.1f}%" if ratio else "",
            ratio <= 0.17 if ratio else None,
        )
        ours_d = with_data.get(name, {}).get("ours_fidelity") or {}
        best = _best_int4_peer(results, name)
        a = ours_d.get("agreement")
        b = best[1].get("agreement") if best else None
        add(
            "19",
            f"int4 with --data above the peer's best int4 (RTN, GPTQ, HQQ) ({name})",
            f"{_agreement(ours_d)} vs {best[0]} {_agreement(best[1])}" if best else "",
            a > b if a is not None and b is not None else None,
        )
        vs_float = row.get("latency_1t_ours_over_float")
        add(
            "19",
            f"int4 without data (default kernel: int8) 1-thread latency ≤ 0.7× float ({name})",
            _ratio(vs_float),
            vs_float <= 0.7 if vs_float else None,
        )
        vs_float = with_data.get(name, {}).get("latency_1t_ours_over_float")
        add(
            "19",
            f"int4 --data (default kernel: int8) 1-thread latency ≤ 0.7× float ({name})",
            _ratio(vs_float),
            vs_float <= 0.7 if vs_float else None,
        )
    for target, measured, verdict in large_decoder.targets(results.get("large_decoder")):
        add("19", target, measured, verdict)


INT4_PEER_ROWS = {"int4": "RTN", "int4+data-gptq": "GPTQ", "int4-hqq": "HQQ"}
"""The int4 rows whose peer column is onnxruntime's RTN, GPTQ and HQQ at block 32."""


def _best_int4_peer(results: dict, model: str) -> tuple[str, dict] | None:
    """(algorithm, fidelity) of the peer's int4 of highest agreement on `model`."""
    found = []
    for scheme, algorithm in INT4_PEER_ROWS.items():
        for row in _rows(results, scheme):
            fidelity = row.get("theirs_fidelity") or {}
            if row["model"] == model and fidelity.get("agreement") is not None:
                found.append((algorithm, fidelity))
    return max(found, key=lambda item: item[1]["agreement"]) if found else None


def _agreement(fidelity: dict) -> str:
    value = fidelity.get("agreement")
    if value is None:
        return "—"
    kind = fidelity.get("agreement_kind", "agreement")
    return f"{kind} {value:.4f}, SQNR {_db(fidelity.get('sqnr_db'))}"


def _calibration_footprint(results: dict, add) -> None:
    """Issue 18: calibration against one float pass over the same samples, per model."""
    scaling = results.get("scaling", [])
    labels = {
        "qconvert": "calibrate",
        "qconvert quantize stage": "quantize --data calibration",
    }
    for model in dict.fromkeys(r["model"] for r in scaling):
        rows = {(r["tool"], r["samples"]): r for r in scaling if r["model"] == model}
        for tool in CALIBRATION_TOOLS:
            ours = {n: r for (t, n), r in rows.items() if t == tool}
            if not ours:
                continue
            pairs = {
                n: (r, rows.get(("float pass", n)))
                for n, r in sorted(ours.items())
                if r.get("ok") and (rows.get(("float pass", n)) or {}).get("ok")
            }
            label = labels[tool]
            if len(pairs) < len(ours):
                failed = [n for n in sorted(ours) if n not in pairs]
                add(
                    "18",
                    f"{label} in a float pass's footprint ({model})",
                    f"did not run at {', '.join(map(str, failed))} samples",
                    False,
                )
                continue
            times = {n: r["seconds"] / f["seconds"] for n, (r, f) in pairs.items()}
            peaks = {n: r["peak_mb"] / f["peak_mb"] for n, (r, f) in pairs.items()}
            add(
                "18",
                f"{label} wall time ≤ {CALIBRATION_TIME}× one float pass ({model})",
                ", ".join(f"{v:.2f}× at {n}" for n, v in times.items()),
                max(times.values()) <= CALIBRATION_TIME,
            )
            lo, hi = min(pairs), max(pairs)
            growth = pairs[hi][0]["peak_mb"] / pairs[lo][0]["peak_mb"] - 1
            add(
                "18",
                f"{label} peak RSS ≤ {CALIBRATION_MEMORY:.0f}× one float pass's, flat "
                f"(< {100 * FLAT:.0f}% growth) from {lo} to {hi} samples ({model})",
                ", ".join(
                    f"{v:.2f}× ({pairs[n][0]['peak_mb']:.0f} MB) at {n}"
                    for n, v in peaks.items()
                )
                + f"; {100 * growth:+.1f}%",
                max(peaks.values()) <= CALIBRATION_MEMORY and growth < FLAT,
            )
    measured = {r["model"] for r in scaling if r["tool"] in CALIBRATION_TOOLS}
    for model in results.get("models", []):
        if model["name"] not in measured:
            add(
                "18",
                f"calibration wall ≤ {CALIBRATION_TIME}× / peak RSS ≤ "
                f"{CALIBRATION_MEMORY:.0f}× one float pass, flat ({model['name']})",
                "missing: calibration scaling not run for this model",
                None,
            )
    if not any(r["tool"] in CALIBRATION_TOOLS for r in scaling):
        add("18", "calibration in a float pass's footprint", "not run", None)


def _ratio(value) -> str:
    return f"{value:.2f}×" if value else ""


def _db(value) -> str:
    return "—" if value is None else f"{value:.1f} dB"
