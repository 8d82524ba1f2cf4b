"""Parallel calibration speed: workers against onnxruntime's own threads, and the merge.

Builds a model where compute dominates (a stack of 1024x1024 MatMuls on [1, 64, 1024]
activations) and ~200 samples, then measures on this machine:

- 1 process, 1 onnxruntime thread (the per-sample cost of one worker);
- 2 local workers, 1 thread each (`--workers 2`), with and without their start-up;
- 1 process, 2 onnxruntime threads;
- the cost of merging one shard's statistics;

and estimates, from the measured per-sample and merge costs, the time for 100k samples on
1, 8 and 64 machines like this one. Every configuration's statistics are checked equal.

    .venv/bin/python tools/bench_parallel.py [--samples 200] [--layers 6]
"""

from __future__ import annotations

import argparse
import os
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper

from qconvert import model as model_io
from qconvert.calibration import CollectSettings, collect_statistics, tensors_to_calibrate
from qconvert.calibration.parallel import DataSpec, collect_split, merge_shards
from qconvert.dataset import DirectorySource, input_specs
from qconvert.passes import prepare

WIDTH, TOKENS = 1024, 64


def build_model(layers: int) -> onnx.ModelProto:
    """MatMul(1024x1024) -> Relu, `layers` times: ~134 MFLOP a MatMul and sample."""
    rng = np.random.default_rng(0)
    nodes, initializers, previous = [], [], "x"
    for k in range(layers):
        weight = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        initializers.append(onnx.numpy_helper.from_array(weight, f"w{k}"))
        nodes.append(onnx.helper.make_node("MatMul", [previous, f"w{k}"], [f"mm{k}"]))
        nodes.append(onnx.helper.make_node("Relu", [f"mm{k}"], [f"r{k}"]))
        previous = f"r{k}"
    graph = onnx.helper.make_graph(
        nodes,
        "matmul_stack",
        [
            onnx.helper.make_tensor_value_info(
                "x", onnx.TensorProto.FLOAT, ["N", TOKENS, WIDTH]
            )
        ],
        [
            onnx.helper.make_tensor_value_info(
                previous, onnx.TensorProto.FLOAT, ["N", TOKENS, WIDTH]
            )
        ],
        initializers,
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def best_of(repeat: int, function):
    """The shortest of `repeat` timings of `function()`, and the last run's result.

    The shortest, because other work on the machine only ever adds time.
    """
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def write_data(folder: Path, layers: int, samples: int) -> None:
    """The model and `samples` standard-normal inputs, in `folder`."""
    onnx.save_model(build_model(layers), folder / "model.onnx")
    (folder / "calib").mkdir()
    (folder / "small").mkdir()
    rng = np.random.default_rng(1)
    for i in range(samples):
        sample = rng.standard_normal((1, TOKENS, WIDTH)).astype(np.float32)
        np.save(folder / "calib" / f"s{i:05d}.npy", sample)
        if i < 2:  # the start-up measurement runs on 2 samples
            np.save(folder / "small" / f"s{i:05d}.npy", sample)


def main() -> None:
    """Measures, checks the statistics agree, prints the numbers and the estimate."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        write_data(folder, args.layers, args.samples)
        float_model = model_io.load_model(folder / "model.onnx")
        specs = input_specs(float_model)
        model = prepare(float_model, min_opset=1)
        tensors = tensors_to_calibrate(model)
        n = args.samples

        def single(threads: int):
            source = DirectorySource(folder / "calib", specs)
            settings = CollectSettings(threads=threads)
            return collect_statistics(model, source, tensors, settings=settings)

        slowest: list[float] = []  # per run of `workers`: its slowest shard, start-up aside

        def workers(count: int, data: str = "calib"):
            observers, split = collect_split(
                model,
                DirectorySource(folder / data, specs),
                tensors,
                settings=CollectSettings(),
                data=DataSpec(folder=str(folder / data), specs=specs),
                workers=count,
                advance=lambda: None,
            )
            slowest.append(max(record.seconds for record in split.shards))
            return observers

        single(1)  # warms the page cache
        one_thread, reference = best_of(args.repeat, lambda: single(1))
        two_threads, by_threads = best_of(args.repeat, lambda: single(2))
        two_workers, by_workers = best_of(args.repeat, lambda: workers(2))
        compute = min(slowest)
        startup, _ = best_of(args.repeat, lambda: workers(2, "small"))
        for name in tensors:
            a, b = by_workers[name], reference[name]
            assert (a.min, a.max, a.count) == (b.min, b.max, b.count), name
            assert np.array_equal(a.bins, b.bins), name
        threads_agree = all(
            np.array_equal(by_threads[name].bins, reference[name].bins)
            and by_threads[name].max == reference[name].max
            for name in tensors
        )
        # Merging: a shard's result is pickled in its worker, unpickled and merged here.
        payload = pickle.dumps(reference)
        shards = 64
        merge_64, _ = best_of(
            args.repeat,
            lambda: merge_shards([pickle.loads(payload) for _ in range(shards)], tensors),
        )
        merge_one = merge_64 / shards

    per_sample = one_thread / n
    cores = len(os.sched_getaffinity(0))
    rows = [
        ("1 worker, 1 thread", one_thread, f"{per_sample * 1e3:.1f} ms/sample"),
        ("1 process, 2 ort threads", two_threads, f"{one_thread / two_threads:.2f}x"),
        ("2 workers, 1 thread each", two_workers, f"{one_thread / two_workers:.2f}x"),
        ("  of which worker start-up", startup, "(same run on 2 samples)"),
        ("  slowest shard alone", compute, f"{one_thread / compute:.2f}x without start-up"),
    ]
    print(
        f"model: {args.layers} x (MatMul {WIDTH}x{WIDTH} + Relu) on [1,{TOKENS},{WIDTH}], "
        f"{len(tensors)} tensors, {n} samples, {cores} cores, best of {args.repeat}, "
        f"load average {os.getloadavg()[0]:.1f} (other work on the cores skews the ratios)"
    )
    for label, seconds, note in rows:
        print(f"  {label:<28}{seconds:7.2f} s   {note}")
    print(
        f"  merge: {merge_one * 1e3:.2f} ms a shard ({len(payload) / 1024:.0f} KiB pickled, "
        f"{len(tensors)} tensors)"
    )
    print(
        "  statistics: 2 workers identical to 1; 2 threads "
        + ("identical too" if threads_agree else "differ in last bits (why workers use 1)")
    )

    total = 100_000
    scaling = min(1.0, one_thread / compute / 2)  # measured efficiency of 2 workers
    print(
        f"\nestimate for {total:,} samples on machines like this one: {cores} single-threaded "
        f"workers each, {scaling:.0%} scaling (measured), {startup:.1f} s start-up, "
        f"{merge_one * 1e3:.2f} ms merge a shard, in the driver:"
    )
    for machines in (1, 8, 64):
        shards = machines * cores
        run = total * per_sample / (shards * scaling)
        merge = shards * merge_one
        print(
            f"  {machines:3d} machine(s), {shards:4d} shards: {startup + run + merge:8.1f} s "
            f"(compute {run:7.1f} s, merge {merge:5.2f} s)"
        )
    print("  not counted: moving the data to the machines; Ray adds ~ms per task.")


if __name__ == "__main__":
    main()
