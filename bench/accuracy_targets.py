"""Issue 16's targets, one row per model and target: the default `quantize --data` against
a fidelity floor per task metric, file size, latency, the best peer, and its wall time.

A row whose figures are missing from the run says which ("not measurable yet"); a target
that does not apply to a model (a size target below its weight floor) says why.
"""

from __future__ import annotations

from collections.abc import Callable

# task -> (the task metric's name, its floor, how it is read from the bench's agreement)
FLOORS: dict[str, tuple[str, float, Callable[[float], float]]] = {
    "classify": ("top-1 agreement", 0.97, lambda a: a),
    # The bench scores detections as the IoU J of the (anchor, class) sets above the score
    # threshold; F1 of the same sets is 2J / (1 + J).
    "detect": ("detection F1", 0.90, lambda j: 2 * j / (1 + j)),
    "ctc": ("exact string", 0.95, lambda a: a),
    "segment": ("mask IoU", 0.97, lambda a: a),
    "embed": ("cosine", 0.99, lambda a: a),
}
SQNR_FLOOR_DB = 25.0  # "anything else"
FILE_RATIO = 0.30
WEIGHT_FLOOR = 1 << 20  # the size target is for models with more than 1 MB of weights
CNN_LATENCY = 0.6
RECIPE_WALL = 30.0  # x one float pass over the calibration samples
FAST_WALL = 2.0
CNN_224 = (
    "resnet_style_224",
    "mobilenetv2_style_224",
    "efficientnet_lite_style_224",
    "efficientnet_lite0",
)
"""The 224x224 CNNs, where the wall-time targets are stated."""
PEERS = {"int8": "ort static", "int8-quark": "quark default", "int8-quark-best": "quark-best"}

Add = Callable[[str, str, str, "bool | str | None"], None]


def issue16(results: dict, add: Add, cnns: tuple[str, ...]) -> None:
    """Adds issue 16's rows for every real model of the run (and the 224 CNNs' wall time)."""
    models = {m["name"]: m for m in results.get("models", [])}
    rows = {(r["model"], r["scheme"]): r for r in results["rows"]}
    floats = _float_passes(results)
    real = [name for name, m in models.items() if m["group"] == "real"]
    if not real:
        add("16", "default int8 on the real models", "no real model in this run", None)
    for name in real:
        int8 = rows.get((name, "int8"), {})
        _floor(add, name, models[name]["task"], int8)
        _size(add, name, int8)
        if name in cnns:
            ratio = int8.get("latency_1t_ours_over_float")
            add(
                "16",
                f"default int8 1-thread latency ≤ {CNN_LATENCY}× float, a CNN ({name})",
                f"{ratio:.2f}×" if ratio else "no int8 latency in this run",
                ratio <= CNN_LATENCY if ratio else None,
            )
        _peers(add, name, rows)
    for name in (n for n in CNN_224 if n in models):
        for scheme, bound, label in (
            ("int8", RECIPE_WALL, "default recipe"),
            ("int8-fast", FAST_WALL, "--recipe fast"),
        ):
            step = rows.get((name, scheme), {}).get("ours_step") or {}
            float_s = floats.get((name, models[name].get("calib_samples")))
            if step.get("ok") and float_s:
                ratio = step["seconds"] / float_s
                measured = f"{ratio:.1f}× ({step['seconds']:.1f} s / {float_s:.2f} s)"
                ok = ratio <= bound
            else:
                measured = "missing: " + (
                    "no float pass over the calibration samples (scaling not run)"
                    if not float_s
                    else f"no {scheme} row that ran"
                )
                ok = None
            add(
                "16",
                f"{label} wall ≤ {bound:.0f}× one float pass over the calibration samples "
                f"({name})",
                measured,
                ok,
            )


def _float_passes(results: dict) -> dict[tuple[str, int], float]:
    return {
        (r["model"], r["samples"]): r["seconds"]
        for r in results.get("scaling", [])
        if r["tool"] == "float pass" and r.get("ok") and r.get("seconds")
    }


def _floor(add: Add, name: str, task: str, int8: dict) -> None:
    fid = int8.get("ours_fidelity") or {}
    if task in FLOORS:
        metric, floor, read = FLOORS[task]
        value = fid.get("agreement")
        add(
            "16",
            f"default int8 {metric} ≥ {100 * floor:.0f}% ({name})"
            if task != "embed"
            else f"default int8 {metric} ≥ {floor} ({name})",
            _missing(int8)
            if value is None
            else (f"{100 * read(value):.1f}%" if task != "embed" else f"{read(value):.4f}")
            + (f" (SQNR {fid['sqnr_db']:.1f} dB)" if fid.get("sqnr_db") is not None else "")
            + (
                f"; float map: {100 * int8['float_mask_share']:.1f}% of pixels > 0.3"
                if int8.get("float_mask_share") is not None
                else ""
            ),
            None if value is None else read(value) >= floor,
        )
        return
    sqnr = fid.get("sqnr_db")
    add(
        "16",
        f"default int8 output SQNR ≥ {SQNR_FLOOR_DB:.0f} dB ({name})",
        _missing(int8) if sqnr is None else f"{sqnr:.1f} dB",
        None if sqnr is None else sqnr >= SQNR_FLOOR_DB,
    )


def _size(add: Add, name: str, int8: dict) -> None:
    weights = int8.get("float_weight_bytes")
    ratio = int8.get("ours_size_ratio")
    target = (
        f"default int8 file ≤ {100 * FILE_RATIO:.0f}% of float, > 1 MB of weights ({name})"
    )
    if weights is not None and weights <= WEIGHT_FLOOR:
        add(
            "16",
            target,
            f"{100 * ratio:.1f}%; {weights / 1e6:.2f} MB of float weights"
            if ratio
            else f"{weights / 1e6:.2f} MB of float weights",
            "not applicable",
        )
        return
    add(
        "16",
        target,
        f"{100 * ratio:.1f}%" if ratio else _missing(int8),
        ratio <= FILE_RATIO if ratio else None,
    )


def _peers(add: Add, name: str, rows: dict) -> None:
    """Ours against the best peer that produced a model that ran; the others are named."""
    ours, peers, missing = None, {}, []
    for scheme, peer in PEERS.items():
        row = rows.get((name, scheme))
        if row is None:
            missing.append(f"{peer} not run")
            continue
        if ours is None and (row.get("ours_fidelity") or {}).get("agreement") is not None:
            ours = _score(row["ours_fidelity"])
        theirs = row.get("theirs_fidelity") or {}
        if theirs.get("agreement") is not None:
            peers[peer] = _score(theirs)
        else:
            step = row.get("theirs_step") or {}
            why = step.get("error") or row.get("theirs_run_error") or "no figures"
            missing.append(f"{peer}: {why}")
    target = f"default int8 task fidelity ≥ the best peer's ({name})"
    tail = f"; {'; '.join(missing)}" if missing else ""
    if ours is None or not peers:
        add(
            "16",
            target,
            ("no qconvert int8 figures" if ours is None else "no peer ran") + tail,
            None,
        )
        return
    best = max(peers, key=peers.get)
    add(
        "16",
        target,
        f"{_fmt(ours)} vs {best} {_fmt(peers[best])}{tail}",
        ours >= peers[best],
    )


def _score(fid: dict) -> tuple[float, float]:
    return (fid["agreement"], fid.get("sqnr_db") or float("-inf"))


def _fmt(value: tuple[float, float]) -> str:
    return f"{100 * value[0]:.1f}% / {value[1]:.1f} dB"


def _missing(row: dict) -> str:
    if not row:
        return "missing: no int8 row in this run"
    step = row.get("ours_step") or {}
    return f"missing: {step.get('error') or row.get('ours_run_error') or 'no figures'}"
