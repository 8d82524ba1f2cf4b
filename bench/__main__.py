"""`python -m bench`: qconvert against onnxruntime's quantizer, side by side, in one run.

    python -m bench                 # the full set (after `make bench` fetched the real models)
    python -m bench --quick         # one tiny model built in code, a smoke run of seconds
    python -m bench --model m.onnx --data calib/ [--eval eval/]
    python -m bench --render        # rewrite results.md from results.json
    python -m bench --parallel-only # only the parallel calibration section
    python -m bench --only large_decoder  # only the 3 GB decoder (int4 memory and wall time)

Writes results.json (every figure) and results.md (the tables) into --out (default bench/).
"""

from __future__ import annotations

import argparse
import compileall
import dataclasses
import datetime
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

from bench import cases as case_set
from bench import large_decoder, measure, parallel, pretrained, real, report, runner
from bench.targets import CALIBRATION_TOOLS, METHOD_TOOLS

HERE = Path(__file__).resolve().parent

FULL = {
    # 64 calibration samples (the peers' docs suggest tens to hundreds); 64 eval samples;
    # latency: at most 100 runs a model (at least 10), cut at about 3 s a model and thread
    # setting, so the full run (all schemes) stays near 20 minutes on 2 cores.
    "sizes": case_set.Sizes(calib=64, eval=64),
    "latency": measure.LatencyPlan(max_runs=100, min_runs=10, warmup=3, budget_s=3.0),
    "scaling": (
        runner.ScalingPlan(
            model="digits_dwsep",
            sizes=(64, 256, 1024),
            tools=(
                "float pass",
                *CALIBRATION_TOOLS,
                *METHOD_TOOLS,
                "ort MinMax",
                "ort Percentile",
            ),
            repeats=3,  # a pass takes a fraction of a second here: median of three runs
        ),
        # The peer's Percentile calibrator keeps every activation of every sample in memory
        # (about 27 MB an image here): capped at 64 images on this 23 GB machine.
        runner.ScalingPlan(
            model="mobilenetv2_style_224",
            sizes=(64, 256, 1024),
            tools=(
                "float pass",
                *CALIBRATION_TOOLS,
                *METHOD_TOOLS,
                "ort MinMax",
                "ort Percentile",
            ),
            caps={"ort Percentile": 64, "ort MinMax": 256, **dict.fromkeys(METHOD_TOOLS, 256)},
            repeats=3,  # a float pass takes 0.3 to 3 s, and one run swung 2x: median of 3
        ),
    ),
    # Issue 18: every other model of the run, calibrated at 64 and 1,024 samples against
    # a float pass over the same samples (the model name is filled in per case). At 64,
    # the calibration count, the median of three: that float pass is also the recipe-wall
    # rows' denominator, and one run of it read 1.5-1.9x the last run's on three CNNs.
    "calibration": runner.ScalingPlan(
        model="",
        sizes=(64, 1024),
        tools=("float pass", *CALIBRATION_TOOLS),
        repeats=3,
        repeated_sizes=(64,),
    ),
    # Issue 10: 2 workers against 1 on a compute-bound model; 512 samples (about 20 s for
    # one worker) amortize starting the second worker as thousands would, in ~2.5 minutes.
    "parallel": parallel.ParallelPlan(
        model="resnet_style_224", samples=512, repeats=3, target=1.7
    ),
}
QUICK = {
    "sizes": case_set.Sizes(calib=16, eval=16),
    "latency": measure.LatencyPlan(max_runs=5, min_runs=3, warmup=1, budget_s=0.1),
    "scaling": (
        runner.ScalingPlan(
            model="tiny_cnn",
            sizes=(8, 32),
            tools=("float pass", *CALIBRATION_TOOLS, *METHOD_TOOLS[:2], "ort MinMax"),
        ),
    ),
    "calibration": runner.ScalingPlan(
        model="", sizes=(8, 32), tools=("float pass", *CALIBRATION_TOOLS)
    ),
    "parallel": parallel.ParallelPlan(model="tiny_cnn", samples=64, repeats=1),
}


def compile_sources() -> None:
    """Writes the bytecode of qconvert's and the bench's modules before anything is timed.

    An installed package comes with its bytecode (pip compiles what it installs: the peers'
    do), and a user's first run writes qconvert's. Where PYTHONDONTWRITEBYTECODE is set, as
    on some CI machines, none is written, and every child process the bench times would
    compile qconvert's sources anew: about 0.37 s of each `calibrate` at 64 samples, as much
    as a float pass over them on the small models. `compileall` writes it regardless."""
    import qconvert

    for package in (Path(qconvert.__file__).parent, HERE):
        compileall.compile_dir(package, quiet=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="one tiny model, seconds")
    parser.add_argument("--model", type=Path, help="bench this model instead of the set")
    parser.add_argument("--data", type=Path, help="calibration folder for --model")
    parser.add_argument("--eval", type=Path, help="evaluation folder for --model")
    parser.add_argument("--out", type=Path, default=HERE, help="where results.* go")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--fetch", action="store_true", help="only download the real models")
    parser.add_argument("--render", action="store_true", help="only re-render results.md")
    parser.add_argument(
        "--only", action="append", default=[], help="model names to run (comma-separated)"
    )
    parser.add_argument("--schemes", default=",".join(v.scheme for v in runner.VARIANTS))
    parser.add_argument("--no-scaling", action="store_true")
    parser.add_argument(
        "--no-parallel", action="store_true", help="skip the parallel calibration section"
    )
    parser.add_argument(
        "--no-large-decoder",
        action="store_true",
        help="skip the 3 GB decoder section (int4 peak memory and wall time)",
    )
    parser.add_argument(
        "--parallel-only",
        action="store_true",
        help="only the parallel calibration section",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("qconvert").setLevel(logging.ERROR)

    if args.fetch:
        failed = real.fetch(args.cache) + pretrained.fetch(args.cache)
        if failed:
            print(f"not fetched (left out of the run): {', '.join(failed)}")
        return 0
    if args.render:
        results = json.loads((args.out / "results.json").read_text())
        (args.out / "results.md").write_text(report.markdown(results))
        print(report.markdown(results))
        return 0
    if (args.model is None) != (args.data is None):
        parser.error("--model and --data go together")

    compile_sources()
    plan = QUICK if args.quick else FULL
    work = args.cache / ("work-quick" if args.quick else "work")
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    notes: list[str] = []
    if args.parallel_only:
        cases = []
    elif args.model is not None:
        cases = [case_set.user_case(args.model, args.data, args.eval)]
    elif args.quick:
        cases = [case_set.quick_case(work)]
    else:
        cases = case_set.sample_cases()
        if not cases:
            notes.append("sample_models/ not found: the sample models were left out")
        cases += case_set.synthetic_cases(work, plan["sizes"])
        found, missing = case_set.real_cases(args.cache, work, plan["sizes"])
        cases += found
        notes += missing
        only = {name for names in args.only for name in names.split(",")} or None
        found, missing = pretrained.cases(args.cache, work, plan["sizes"], only)
        cases += found
        notes += missing
    if args.only:
        only = {name for names in args.only for name in names.split(",")}
        cases = [c for c in cases if c.name in only]
    wanted = set(args.schemes.split(","))
    variants = [v for v in runner.VARIANTS if v.scheme in wanted]
    settings = runner.Settings(latency=plan["latency"])

    rows = []
    for index, case in enumerate(cases):
        logging.info("%s (%s)", case.name, case.group)
        rows += runner.bench_case(case, variants, settings, work, index)

    scaling_rows = []
    if not args.no_scaling and args.model is None and not args.parallel_only:
        by_name = {c.name: c for c in cases}
        named = {p.model for p in plan["scaling"]}
        every = [
            dataclasses.replace(plan["calibration"], model=c.name)
            for c in cases
            if c.name not in named
        ]
        for scaling_plan in (*plan["scaling"], *every):
            if scaling_plan.model in by_name:
                logging.info("calibration scaling: %s", scaling_plan.model)
                scaling_rows += runner.scaling(
                    by_name[scaling_plan.model], scaling_plan, work, settings.step_timeout_s
                )
            else:
                notes.append(
                    f"calibration scaling on {scaling_plan.model} skipped: not in this run"
                )

    parallel_section = None
    if not args.no_parallel and args.model is None:
        logging.info("parallel calibration: %s", plan["parallel"].model)
        parallel_section = parallel.run(plan["parallel"], work)

    large_section = None
    wanted_models = {name for names in args.only for name in names.split(",")}
    if (
        not (args.quick or args.no_large_decoder or args.parallel_only)
        and args.model is None
        and (not wanted_models or large_decoder.NAME in wanted_models)
    ):
        logging.info("%s: int4 memory and wall time", large_decoder.NAME)
        large_section = large_decoder.run(work)

    results = {
        "meta": _meta(args.quick, time.perf_counter() - started, plan),
        "models": [
            {
                "name": c.name,
                "group": c.group,
                "task": c.task,
                "about": c.about,
                "model": str(c.model),
                "calib_samples": _count(c.calib),
                "eval_samples": _count(c.eval),
            }
            for c in cases
        ],
        "rows": rows,
        "scaling": scaling_rows,
        "parallel": parallel_section,
        "large_decoder": large_section,
        "notes": notes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    text = report.markdown(results)
    (args.out / "results.md").write_text(text)
    print(text)
    return 0


def _count(folder: Path) -> int:
    return sum(
        1
        for p in Path(folder).iterdir()
        if p.suffix in (".npy", ".npz") and p.name != "labels.npy"
    )


def _meta(quick: bool, seconds: float, plan: dict) -> dict:
    import onnxruntime

    import qconvert

    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu}, {os.cpu_count()} logical cores, "
        f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "qconvert": qconvert.__version__,
        "quick": quick,
        "bench_seconds": round(seconds, 1),
        "latency_plan": str(plan["latency"]),
        "calib_eval_samples": str(plan["sizes"]),
    }


if __name__ == "__main__":
    sys.exit(main())
