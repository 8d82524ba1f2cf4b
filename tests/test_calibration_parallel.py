"""Calibration split over local worker processes and over passes: the same file, always."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import worker_faults
from conftest import SAMPLES

import qconvert
from qconvert import api, testing
from qconvert import model as model_io
from qconvert.calibration import CollectSettings, TensorObserver, collect_statistics, parallel
from qconvert.calibration.collect import _batches
from qconvert.calibration.graphs import tensors_to_calibrate
from qconvert.calibration.parallel import chunk
from qconvert.calibration.shards import merge_shards, split
from qconvert.dataset import Sample
from qconvert.passes import prepare

DIGITS = SAMPLES / "digits_cnn"


def _calibrate(run_cli, model, data, out, *options):
    result = run_cli("calibrate", model, "--data", data, "-o", out, *options)
    assert result.code == 0, result.err
    return result


def _assert_clean_failure(result, out, *fragments, code=3):
    assert result.code == code, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("Error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture(scope="module")
def digits_single(tmp_path_factory):
    """digits_cnn's calibration file made in one process: the reference."""
    out = tmp_path_factory.mktemp("single") / "single.json"
    api.calibrate(DIGITS / "model.onnx", DIGITS / "calib", output=out)
    return out


@pytest.mark.slow
def test_two_workers_write_the_single_process_file(run_cli, tmp_path, digits_single):
    out = tmp_path / "workers.json"
    result = _calibrate(
        run_cli, DIGITS / "model.onnx", DIGITS / "calib", out, "--workers", "2"
    )
    assert out.read_bytes() == digits_single.read_bytes()
    # The split is reported: this process and a spawned one took 32 chunks of 8 samples
    # between them, each at least its first.
    assert (
        "split: 2 local processes (this one and 1 spawned), 32 chunks shared as each got "
        "free, 1 onnxruntime thread each"
    ) in result.out
    lines = result.out.splitlines()
    mine = next(line for line in lines if line.startswith("  worker 1: "))
    theirs = next(line for line in lines if line.startswith("  worker 2: "))
    assert ", this process, " in mine and ", local process " in theirs
    samples = [int(line.split()[2]) for line in (mine, theirs)]
    assert sum(samples) == 256 and min(samples) >= 8


@pytest.mark.parametrize("per_pass", ["1", "4"])
def test_tensors_per_pass_writes_the_single_process_file(
    run_cli, tmp_path, digits_single, per_pass
):
    out = tmp_path / "passes.json"
    result = _calibrate(
        run_cli, DIGITS / "model.onnx", DIGITS / "calib", out, "--tensors-per-pass", per_pass
    )
    assert out.read_bytes() == digits_single.read_bytes()
    passes = -(-11 // int(per_pass))  # digits_cnn has 11 calibrated tensors
    assert f"{passes} passes over the data" in result.out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits_dwsep", "digits_transformer"])
def test_workers_and_passes_together_write_the_single_process_file(run_cli, tmp_path, name):
    """Depthwise convolutions, attention, LayerNorm (digits_cnn is tested above).

    onnxruntime's graph optimizations change digits_dwsep's tensors in their last bits,
    and how depends on the tensors exposed, so every pass must run the graph optimized
    with all of them exposed; unoptimized, digits_cnn's differ when a worker runs another
    thread count than the single process.
    """
    model, data = SAMPLES / name / "model.onnx", SAMPLES / name / "calib"
    single, spread = tmp_path / "single.json", tmp_path / "spread.json"
    _calibrate(run_cli, model, data, single)
    _calibrate(run_cli, model, data, spread, "--workers", "2", "--tensors-per-pass", "4")
    assert spread.read_bytes() == single.read_bytes()


@pytest.mark.slow
def test_workers_batches_and_passes_with_mixed_shapes(run_cli, tmp_path):
    """Samples of varying length, batched by 3: shards cut inside a run of equal shapes.

    Lengths near 200 make the hidden tensor (16 * L values a sample) big enough to be
    histogrammed at a stride, so a batch split differently would change the histogram.
    """
    proto = testing.sequence_mlp()
    model = testing.save(proto, tmp_path / "seq.onnx")
    rng = np.random.default_rng(0)
    a, b, c = 196, 199, 201
    lengths = [a, a, a, a, a, b, b, a, a, a, a, a, a, c, c, c, c, a, a, a]
    testing.write_samples(
        tmp_path / "calib",
        [{"tokens": rng.standard_normal((1, n, 8)).astype(np.float32)} for n in lengths],
    )
    single, spread = tmp_path / "single.json", tmp_path / "spread.json"
    _calibrate(run_cli, model, tmp_path / "calib", single, "--batch-size", "3")
    result = _calibrate(
        run_cli,
        model,
        tmp_path / "calib",
        spread,
        *("--batch-size", "3", "--workers", "2", "--tensors-per-pass", "2"),
    )
    assert spread.read_bytes() == single.read_bytes()
    # 7 batches of 3, a chunk each; the spawned worker's first, samples 3-5, holds a change
    # of shape, so its batches are cut by shape as well as at the multiples of 3.
    assert "7 chunks shared as each got free" in result.out


def test_shards_are_contiguous_and_cut_at_batch_multiples():
    assert [(s.start, s.stop) for s in split(10, 3)] == [(0, 3), (3, 6), (6, 10)]
    assert [(s.start, s.stop) for s in split(20, 2, batch_size=3)] == [(0, 9), (9, 20)]
    assert [(s.start, s.stop) for s in split(5, 8, batch_size=2)] == [(0, 2), (2, 4), (4, 5)]
    assert [(s.start, s.stop) for s in split(1, 4)] == [(0, 1)]
    for total, parts, batch in [(257, 8, 4), (100, 7, 1), (33, 2, 16)]:
        shards = split(total, parts, batch_size=batch)
        assert shards[0].start == 0 and shards[-1].stop == total
        for left, right in itertools.pairwise(shards):
            assert left.stop == right.start and right.start % batch == 0
        assert all(s.stop > s.start for s in shards)


def test_chunks_are_many_per_worker_and_bounded_in_size():
    assert [len(chunk(256, 2)), {c.stop - c.start for c in chunk(256, 2)}] == [32, {8}]
    big = chunk(100_000, 2, batch_size=4)  # at most 32 batches a chunk: a short last wait
    assert max(c.stop - c.start for c in big) <= 128 and big[-1].stop == 100_000
    assert [(c.start, c.stop) for c in chunk(5, 2, batch_size=2)] == [(0, 2), (2, 4), (4, 5)]


def test_a_part_starting_at_a_batch_multiple_runs_the_same_batches():
    """The batching rule that makes shards exact: batches never cross a multiple of B."""
    shapes = [1, 1, 2, 2, 2, 2, 2, 1, 1, 1, 2]
    samples = [
        Sample(f"s{i}", {"x": np.zeros((1, n), np.float32)}) for i, n in enumerate(shapes)
    ]

    def runs(part, offset=0):
        spans, position = [], offset
        for batch in _batches(part, 3):
            spans.append((position, position + batch.count))
            position += batch.count
        return spans

    whole = runs(samples)
    assert whole == [(0, 2), (2, 3), (3, 6), (6, 7), (7, 9), (9, 10), (10, 11)]
    for cut in (3, 6, 9):
        assert runs(samples[:cut]) + runs(samples[cut:], cut) == whole


def test_merging_shards_is_exact_in_any_order(tmp_path):
    """Shard results merged in any order equal one pass: integer bins, order-free min/max."""
    proto = testing.conv_bn_relu()
    model = prepare(model_io.load_model(testing.save(proto, tmp_path / "m.onnx")), min_opset=1)
    names = tensors_to_calibrate(model)
    samples = [Sample(f"s{i}", testing.random_inputs(proto, seed=i)) for i in range(12)]
    settings = CollectSettings(histogram_values=50)
    whole = collect_statistics(model, samples, names, settings=settings)
    parts = [
        collect_statistics(model, samples[s.start : s.stop], names, settings=settings)
        for s in split(len(samples), 4)
    ]
    for order in (parts, parts[::-1], [parts[2], parts[0], parts[3], parts[1]]):
        merged = merge_shards(order, names)
        for name in names:
            a, b = merged[name], whole[name]
            assert (a.min, a.max, a.count, a.exponent, a.first_bin) == (
                b.min,
                b.max,
                b.count,
                b.exponent,
                b.first_bin,
            ), name
            np.testing.assert_array_equal(a.bins, b.bins)
    assert isinstance(merged[names[0]], TensorObserver)


class _Counting:
    """A `Progress` that records the totals announced and the advances received."""

    def __init__(self):
        self.totals, self.advances = [], 0

    def task(self, description, total):
        import contextlib

        self.totals.append(total)

        @contextlib.contextmanager
        def context():
            def advance():
                self.advances += 1

            yield advance

        return context()


@pytest.mark.slow
def test_progress_of_all_workers_reaches_one_total(tmp_path, tiny_cnn):
    progress = _Counting()
    calibration = api.calibrate(
        tiny_cnn, tmp_path / "calib", workers=2, tensors_per_pass=3, progress=progress
    )
    passes = calibration.split.passes
    assert passes == -(-len(calibration.observers) // 3) and passes > 1
    assert progress.totals == [32 * passes]
    assert progress.advances == 32 * passes
    records = calibration.split.shards
    assert [r.index for r in records] == [0, 1]
    assert sum(r.samples for r in records) == 32 * passes
    assert sum(r.chunks for r in records) == 32 * passes  # 32 chunks of 1 sample a pass
    assert min(r.chunks for r in records) >= passes  # each worker's own first chunk


def _calibrate_in_child(*args):
    """`qconvert` in a fresh process whose spawned workers carry `worker_faults`."""
    script = Path(__file__).with_name("calibrate_in_child.py")
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
def test_a_worker_killed_mid_run_ends_the_run_with_no_file(tmp_path, tiny_cnn):
    """The spawned worker is killed (SIGKILL) at its first sample: exit 3, nothing written."""
    worker_faults.write_fault(tmp_path / "calib")
    out = tmp_path / "out" / "out.json"
    out.parent.mkdir()
    done = _calibrate_in_child(
        "calibrate", tiny_cnn, "--data", tmp_path / "calib", "-o", out, "--workers", "2"
    )
    assert done.returncode == 3, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("Error: Calibration worker 2 (local process "), lines[0]
    assert "died (exit code -9); nothing was written." in lines[0]
    assert "--workers" in lines[0]  # the hint
    assert not list(out.parent.iterdir())


@pytest.mark.slow
def test_workers_apply_the_users_sample_size_limit(run_cli, tmp_path, tiny_cnn):
    """Sample 1 is the spawned worker's first (chunks of 1 sample; worker k starts at
    chunk k), and over --max-sample-bytes: the worker refuses it, as one process would."""
    data = tmp_path / "calib"
    kept = np.load(data / "s00001.npy")
    (data / "s00001.npy").unlink()
    np.savez(data / "s00001.npz", input=kept, pad=np.zeros(4096))
    limit = (data / "s00000.npy").stat().st_size
    out = tmp_path / "out.json"
    result = run_cli(
        "calibrate", tiny_cnn, "--data", data, "-o", out, "--workers", "2",
        "--max-sample-bytes", limit,
    )  # fmt: skip
    _assert_clean_failure(
        result, out, f"Sample '{data / 's00001.npz'}' unpacks to ", f"limit of {limit:,}"
    )


@pytest.mark.slow
def test_bad_data_in_a_worker_names_the_sample(run_cli, tmp_path, tiny_cnn):
    bad = tmp_path / "calib" / "s00020.npy"
    bad.write_bytes(b"\x93NUMPY garbage")
    out = tmp_path / "out.json"
    result = run_cli(
        "calibrate", tiny_cnn, "--data", tmp_path / "calib", "-o", out, "--workers", "2"
    )
    _assert_clean_failure(result, out, str(bad), "could not be read")


def test_ray_without_ray_installed_is_a_usage_error(run_cli, tmp_path, tiny_cnn, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    out = tmp_path / "out.json"
    result = run_cli("calibrate", tiny_cnn, "--data", tmp_path / "calib", "-o", out, "--ray")
    _assert_clean_failure(result, out, "--ray needs Ray", "qconvert[ray]", code=2)


def test_bad_ray_data_mode_and_worker_count_are_usage_errors(run_cli, tmp_path, tiny_cnn):
    out = tmp_path / "out.json"
    for options in (("--workers", "0"), ("--ray-data", "nfs"), ("--tensors-per-pass", "0")):
        result = run_cli(
            "calibrate", tiny_cnn, "--data", tmp_path / "calib", "-o", out, *options
        )
        assert result.code == 2, result.err
        assert options[0] in result.err
        assert not out.exists()


def test_importing_qconvert_does_not_import_ray():
    code = (
        "import sys, qconvert, qconvert.api, qconvert.cli.calibrate, "
        "qconvert.calibration.parallel, qconvert.calibration.ray_backend; "
        "print('ray' in sys.modules)"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "False"


@pytest.mark.parametrize("quiet", [False, True])
def test_the_resource_tracker_leaves_stderr_to_the_one_line_error(tmp_path, quiet):
    # A run ended by a killed worker can leave semaphores to multiprocessing's resource
    # tracker, which warns on stderr at exit; run_local starts it with its warnings off.
    script = tmp_path / "leak.py"
    script.write_text(
        "import multiprocessing, os\n"
        "from qconvert.calibration.parallel import _start_quiet_resource_tracker\n"
        f"if {quiet}:\n"
        "    _start_quiet_resource_tracker()\n"
        "lock = multiprocessing.get_context('spawn').Lock()\n"
        "os._exit(3)\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 3
    assert ("leaked semaphore" in done.stderr) is not quiet, done.stderr


# --- --workers auto ----------------------------------------------------------------------


def _many_samples(tmp_path, model, count):
    return testing.write_samples(
        tmp_path / "many", [testing.random_inputs(model, seed=i) for i in range(count)]
    )


def test_auto_workers_run_batches_side_by_side_in_this_process(
    tmp_path, tiny_cnn, monkeypatch
):
    # One session, a batch per core at once: no process to spawn, whose interpreter,
    # model and session would each cost a float pass's memory again.
    def no_spawn(self, count):
        raise AssertionError("--workers auto started a process")

    data = _many_samples(tmp_path, testing.conv_bn_relu(), 40)
    monkeypatch.setattr(parallel, "auto_workers", lambda: 3)
    monkeypatch.setattr(parallel._LocalRun, "_spawn", no_spawn)
    alone = qconvert.calibrate(tiny_cnn, data, workers=None, tensors_per_pass=3)
    assert [record.worker for record in alone.split.shards] == ["this process"]
    assert alone.split.backend == "this process (--workers auto: 3 batches at once)"
    single = qconvert.calibrate(tiny_cnn, data, workers=1, tensors_per_pass=3)
    assert alone.to_json() == single.to_json()


def test_workers_take_a_count_or_auto(run_cli, tmp_path, tiny_cnn):
    out = tmp_path / "c.json"
    result = run_cli("calibrate", tiny_cnn, "--data", tmp_path / "calib", "-o", out)
    assert result.code == 0 and out.exists()
    result = run_cli(
        "calibrate",
        tiny_cnn,
        "--data",
        tmp_path / "calib",
        "-o",
        out,
        "--force",
        "--workers",
        "auto",
    )
    assert result.code == 0
    result = run_cli("calibrate", tiny_cnn, "--data", tmp_path / "calib", "--workers", "some")
    assert result.code == 2 and "neither a number nor 'auto'" in result.err


def test_quantize_calibrates_over_workers_into_the_same_model(run_cli, tmp_path, tiny_cnn):
    data = tmp_path / "calib"
    models = {}
    for workers in ("1", "2", "auto"):
        out = tmp_path / f"q.{workers}.onnx"
        result = run_cli("quantize", tiny_cnn, "--data", data, "-o", out, "--workers", workers)
        assert result.code == 0, result.err
        models[workers] = out.read_bytes()
    assert models["2"] == models["1"] == models["auto"]
    result = run_cli("quantize", tiny_cnn, "--data", data, "--workers", "0")
    assert result.code == 2 and "0 is not at least 1" in result.err
