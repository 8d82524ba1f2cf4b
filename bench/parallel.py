"""Parallel calibration: 2 single-threaded workers against 1, and against onnxruntime threads.

On a model where compute dominates (resnet_style_224 in the full run), with enough samples
that starting a worker is amortized as it is for a user with thousands of samples, one fresh
child process loads and prepares the model, then times `collect_split`, the stage
`qconvert calibrate` spends its time in, in five configurations taken in turn:

- 1 worker, 1 thread (one single-threaded process, one run at a time as each worker of
  a split runs: the per-sample cost of a worker);
- 2 workers, 1 thread each (`--workers 2`: this process and a spawned one, start-up of the
  spawned one, its model transfer and the merge included);
- 1 process, 2 onnxruntime threads (both cores through onnxruntime's own thread pool);
- 1 process, 2 runs at once (one onnxruntime thread a run, two batches side by side on
  the one session);
- default (`--workers auto`: one process, a batch per core at once).

Each configuration's best run counts (other work on the machine only ever adds time); the
load average at each run is recorded. Also measured: the 2-worker run on 2 samples (what
starting the second worker costs), and merging one worker's result (unpickling it and
`TensorObserver.merge`). From these, the time for 100k samples on 1, 8 and 64 machines
like this one is estimated (see `estimate`). Every configuration's statistics are compared
with the 1-worker ones.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import pickle
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from bench import builders, data

ESTIMATE_SAMPLES = 100_000
ESTIMATE_MACHINES = (1, 8, 64)


@dataclass(frozen=True, slots=True, kw_only=True)
class ParallelPlan:
    """Which model, how many samples, how many rounds; `target`: the speed-up to reach."""

    model: str
    samples: int
    repeats: int
    target: float | None = None


CONFIGS = {
    # Single-threaded: one run at a time, as each worker of a split runs.
    "1 worker, 1 thread": {"workers": 1, "threads": 1},
    "2 workers, 1 thread each": {"workers": 2, "threads": 1},
    "1 process, 2 onnxruntime threads": {"workers": 1, "threads": 2},
    "1 process, 2 runs at once": {"workers": 1, "threads": 1, "concurrent_runs": 2},
    # What `qconvert calibrate` does by default: a run per core at once.
    "default (--workers auto)": {"workers": None, "threads": 1},
}
ONE, TWO_WORKERS, TWO_THREADS, ALONE, DEFAULT = CONFIGS

_BUILDERS = {
    "resnet_style_224": (builders.resnet_style, 224),
    "mobilenetv2_style_224": (builders.mobilenetv2_style, 224),
    "tiny_cnn": (builders.tiny_cnn, 32),
}


def prepare_case(work: Path, plan: ParallelPlan) -> tuple[Path, Path, Path]:
    """The model, its `plan.samples` synthetic images, and 2 of them (for start-up)."""
    build, size = _BUILDERS[plan.model]
    folder = work / "parallel" / plan.model
    model = folder / "model.onnx"
    if not model.exists():
        folder.mkdir(parents=True, exist_ok=True)
        onnx.save(build(), model)
    calib, small = folder / f"calib_{plan.samples}", folder / "calib_2"
    for target, count in ((calib, plan.samples), (small, 2)):
        if len(list(target.glob("*.npy"))) != count:
            target.mkdir(parents=True, exist_ok=True)
            for old in target.iterdir():
                old.unlink()
            for start in range(0, count, 64):  # 64 at a time: bounded memory
                images = data.synthetic_images(min(64, count - start), size, seed=11 + start)
                for offset, feeds in enumerate(images):
                    np.save(target / f"{start + offset:05d}.npy", feeds["input"])
    return model, calib, small


def run(plan: ParallelPlan, work: Path, timeout_s: float = 1800.0) -> dict:
    """Measures `plan` in a fresh child process; returns the section of results.json."""
    model, calib, small = prepare_case(work, plan)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        future = pool.submit(_measure, str(model), str(calib), str(small), plan.repeats)
        try:
            measured = future.result(timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - a failure is a result to report
            return {"plan": asdict(plan), "error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"plan": asdict(plan), "cores": os.cpu_count(), **measured, **estimate(measured)}


def _measure(model_path: str, calib: str, small: str, repeats: int) -> dict:
    from qconvert import model as model_io
    from qconvert.calibration import CollectSettings, tensors_to_calibrate
    from qconvert.calibration.parallel import collect_split
    from qconvert.calibration.shards import DataSpec, merge_shards
    from qconvert.dataset import DirectorySource, input_specs
    from qconvert.passes import prepare

    float_model = model_io.load_model(model_path)
    specs = input_specs(float_model)
    model = prepare(float_model, min_opset=1)
    tensors = tensors_to_calibrate(model)

    def calibrate(folder: str, workers: int | None, threads: int, concurrent_runs: int = 1):
        cpu, start = _cpu_seconds(), time.perf_counter()
        settings = CollectSettings(threads=threads, concurrent_runs=concurrent_runs)
        observers, split = collect_split(
            model,
            DirectorySource(folder, specs),
            tensors,
            settings=settings,
            data=DataSpec(folder=folder, specs=specs),
            workers=workers,
            advance=lambda: None,
        )
        calibrate.cpu = _cpu_seconds() - cpu  # this process and its joined workers
        return time.perf_counter() - start, observers, split

    calibrate(small, 1, 1)  # warms the page cache and onnxruntime's first-session set-up
    runs, results, splits = [], {}, {}
    for round_ in range(repeats):
        for label, config in CONFIGS.items():
            seconds, observers, split = calibrate(calib, **config)
            runs.append(
                {
                    "config": label,
                    "round": round_,
                    "seconds": round(seconds, 3),
                    "cpu_seconds": round(calibrate.cpu, 3),
                    "load": round(os.getloadavg()[0], 2),
                }
            )
            results[label], splits[label] = observers, split
    startup = []
    for _ in range(repeats):
        alone, _, _ = calibrate(small, 1, 1)
        together, _, _ = calibrate(small, 2, 1)
        startup.append(together - alone)

    reference = results[ONE]
    payload = pickle.dumps(reference)
    shards = 64
    merges = []
    for _ in range(repeats):
        start = time.perf_counter()
        merge_shards([pickle.loads(payload) for _ in range(shards)], tensors)
        merges.append((time.perf_counter() - start) / shards)
    return {
        "model_file": model_path,
        "tensors": len(tensors),
        "samples": len(DirectorySource(calib, specs)),
        "runs": runs,
        "identical": {label: _same(results[label], reference, tensors) for label in CONFIGS},
        "split": splits[TWO_WORKERS].describe(),
        "startup_s": round(min(startup), 3),
        "merge_ms": round(1e3 * min(merges), 3),
        "result_kib": round(len(payload) / 1024, 1),
    }


def _cpu_seconds() -> float:
    """User and system time of this process and of its children that have ended."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def cpu_speedup(section: dict) -> float | None:
    """2 x CPU time of 1 worker / CPU time of 2 workers (both processes), medians.

    What 2 workers reach when both cores are theirs (the spawned worker's start-up
    counted, waiting for the last chunk not): a figure that other work on the machine
    skews much less than wall time, since a process waiting for a core spends no CPU time.
    """
    one = [r["cpu_seconds"] for r in section.get("runs", []) if r["config"] == ONE]
    two = [r["cpu_seconds"] for r in section.get("runs", []) if r["config"] == TWO_WORKERS]
    if not one or not two:
        return None
    return 2 * statistics.median(one) / statistics.median(two)


def _same(a: dict, b: dict, tensors) -> bool:
    return all(
        (a[n].min, a[n].max, a[n].count) == (b[n].min, b[n].max, b[n].count)
        and np.array_equal(a[n].bins, b[n].bins)
        for n in tensors
    )


def best(section: dict, label: str) -> float | None:
    """The shortest time of configuration `label`."""
    times = [r["seconds"] for r in section.get("runs", []) if r["config"] == label]
    return min(times) if times else None


def median(section: dict, label: str) -> float | None:
    times = [r["seconds"] for r in section.get("runs", []) if r["config"] == label]
    return statistics.median(times) if times else None


def estimate(measured: dict) -> dict:
    """The time for 100k samples on M machines like this one, from the measured costs.

    From CPU time, not wall time: the workers are single-threaded, so on a machine of
    their own their wall time is their CPU time, and CPU time is what other work on a
    shared machine skews least (medians of the rounds).

    p: seconds a sample for one single-threaded worker (1-worker CPU time / samples);
    e: the efficiency of two concurrent workers, half their CPU-time speed-up (the
       spawned worker's start-up and any slowdown from sharing memory bandwidth count
       against it);
    s: starting a worker (2-worker run on 2 samples minus the 1-worker one, wall time);
    m: merging one worker's result in the driver.
    With C cores a machine and C single-threaded workers each (Ray tasks across machines,
    every one starting after s, to err on the slow side):

        T(M) = s + N * p / (M * C * e) + M * C * m

    Not counted: moving the data to the machines, Ray's per-task scheduling (milliseconds).
    """
    one = [r["cpu_seconds"] for r in measured.get("runs", []) if r["config"] == ONE]
    speedup = cpu_speedup(measured)
    if not one or speedup is None:
        return {}
    cores = 2
    p = statistics.median(one) / measured["samples"]
    e = min(1.0, speedup / cores)
    s = max(0.0, measured["startup_s"])
    m = measured["merge_ms"] / 1e3
    rows = []
    for machines in ESTIMATE_MACHINES:
        workers = machines * cores
        compute = ESTIMATE_SAMPLES * p / (workers * e)
        merge = workers * m
        rows.append(
            {
                "machines": machines,
                "workers": workers,
                "seconds": round(s + compute + merge, 1),
                "compute_s": round(compute, 1),
                "merge_s": round(merge, 3),
            }
        )
    return {
        "per_sample_ms": round(1e3 * p, 2),
        "efficiency": round(e, 3),
        "estimate": rows,
    }


def markdown(section: dict | None) -> list[str]:
    """The section of results.md."""
    if not section:
        return ["(not run)"]
    plan = section["plan"]
    if "error" in section:
        return [f"failed: {section['error']}"]
    one = best(section, ONE)
    loads = [r["load"] for r in section["runs"]]
    lines = [
        f"{plan['model']}, {section['samples']} samples, {section['tensors']} calibrated "
        f"tensors, `collect_split` (the calibration stage) in one fresh process, "
        f"{plan['repeats']} rounds taken in turn, best and median of each; "
        f"{section['cores']} logical cores, load average {min(loads):.1f} to "
        f"{max(loads):.1f} during the runs (other work on the cores lowers the speed-ups).",
        "",
        "| configuration | best s | median s | speed-up vs 1 worker (best / median) "
        "| CPU s, all processes (median) | statistics vs 1 worker |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for label in CONFIGS:
        fast, middle = best(section, label), median(section, label)
        cpu = statistics.median(
            r["cpu_seconds"] for r in section["runs"] if r["config"] == label
        )
        same = "identical" if section["identical"][label] else "differ in last bits"
        lines.append(
            f"| {label} | {fast:.2f} | {middle:.2f} "
            f"| {one / fast:.2f}× / {median(section, ONE) / middle:.2f}× | {cpu:.2f} "
            f"| {same} |"
        )
    lines += [
        "",
        f"CPU-time speed-up of 2 workers (2 × CPU of 1 worker / CPU of both): "
        f"{cpu_speedup(section):.2f}×: what they reach when both cores are theirs (the "
        "spawned worker's start-up counted, waiting for the last chunk not); other work on "
        "the machine skews it much less than wall time. (onnxruntime's own threads spin "
        "while they wait, so their CPU time is no measure of work.)",
        "",
        f"Starting the second worker (2-worker run on 2 samples minus the 1-worker one): "
        f"{section['startup_s']:.2f} s. Merging one worker's result "
        f"({section['result_kib']:.0f} KiB pickled): {section['merge_ms']:.2f} ms. "
        "How the last 2-worker run split the work:",
        "",
        *(f"    {line}" for line in section["split"]),
        "",
    ]
    if section.get("estimate"):
        lines += [
            f"Estimate for {ESTIMATE_SAMPLES:,} samples on machines like this one, 2 "
            f"single-threaded workers each, from CPU time (a single-threaded worker's wall "
            f"time on a machine of its own): {section['per_sample_ms']:.1f} ms a sample for "
            f"one worker, {100 * section['efficiency']:.0f}% efficiency of two concurrent "
            f"workers (half the CPU-time speed-up above), {section['startup_s']:.2f} s "
            f"start-up, {section['merge_ms']:.2f} ms to merge each worker's result in the "
            "driver; T(M) = start-up + N × per-sample / (2M × efficiency) + 2M × merge. "
            "Not counted: moving the data to the machines, Ray's per-task scheduling "
            "(milliseconds).",
            "",
            "| machines | workers | estimated time | of which compute | of which merge |",
            "|---:|---:|---:|---:|---:|",
            *(
                f"| {r['machines']} | {r['workers']} | {_duration(r['seconds'])} "
                f"| {_duration(r['compute_s'])} | {r['merge_s']:.2f} s |"
                for r in section["estimate"]
            ),
        ]
    return lines


def target(section: dict | None) -> tuple[str, str, bool | None]:
    """The issue's target line: (target, measured, met)."""
    plan = (section or {}).get("plan") or {}
    text = (
        f"2 single-threaded workers ≥ {plan.get('target') or 1.7}× 1 worker "
        f"({plan.get('model', 'compute-bound model')}, calibration stage)"
    )
    one, two = best(section or {}, ONE), best(section or {}, TWO_WORKERS)
    if one is None or two is None:
        return text, (section or {}).get("error", "not run"), None
    loads = [r["load"] for r in section["runs"]]
    measured = (
        f"{one / two:.2f}× best, {median(section, ONE) / median(section, TWO_WORKERS):.2f}× "
        f"median (load average {min(loads):.1f}-{max(loads):.1f}); "
        f"{cpu_speedup(section):.2f}× in CPU time"
    )
    if plan.get("target") is None:
        return text, measured + "; no target for this model", None
    return text, measured, one / two >= plan["target"]


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
