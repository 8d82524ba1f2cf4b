"""Calibration on a real local Ray cluster (loopback only): the single-process file, always.

One cluster serves the module; `qconvert calibrate --ray` finds it initialized in this
process and uses it as it is.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import worker_faults
from conftest import SAMPLES

from qconvert import api

pytestmark = pytest.mark.slow

DIGITS = SAMPLES / "digits_cnn"


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """A 2-CPU Ray cluster bound to loopback, for the whole module.

    Ray resolves 127.0.0.1 to the machine's outward address unless told that this is a
    single-machine cluster, which must be said before Ray is imported; its processes
    inherit it. Its worker processes carry `worker_faults` (pickled by value: they cannot
    import the tests), which does nothing unless a data folder asks for a fault.
    """
    before = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(worker_faults)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"worker_process_setup_hook": worker_faults.install},
    )
    assert [node["NodeManagerAddress"] for node in ray.nodes()] == ["127.0.0.1"]
    yield
    ray.shutdown()
    if before is None:
        del os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"]
    else:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = before


@pytest.fixture(scope="module")
def digits_single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "single.json"
    api.calibrate(DIGITS / "model.onnx", DIGITS / "calib", output=out)
    return out


def _calibrate(run_cli, out, *options, data=DIGITS / "calib"):
    return run_cli("calibrate", DIGITS / "model.onnx", "--data", data, "-o", out, *options)


def _digits_copy(folder):
    """digits_cnn's calibration samples, linked into `folder` (which may then hold a fault)."""
    folder.mkdir()
    for sample in sorted((DIGITS / "calib").iterdir()):
        (folder / sample.name).symlink_to(sample)
    return folder


def test_ray_reading_the_folder_writes_the_single_process_file(
    run_cli, tmp_path, digits_single
):
    out = tmp_path / "ray.json"
    result = _calibrate(run_cli, out, "--ray")
    assert result.code == 0, result.err
    assert out.read_bytes() == digits_single.read_bytes()
    # One shard per CPU of the cluster; every node of a local cluster reads the folder.
    assert "split: Ray (1 node(s), 2 CPUs, shared folder)" in result.out
    assert "shard 2: samples 128-255, Ray node 127.0.0.1" in result.out


def test_ray_sending_samples_writes_the_single_process_file(run_cli, tmp_path, digits_single):
    out = tmp_path / "ray.json"
    result = _calibrate(run_cli, out, "--workers", "3", "--ray-data", "send", "--ray")
    assert result.code == 0, result.err
    assert out.read_bytes() == digits_single.read_bytes()
    assert "samples sent through the object store" in result.out
    assert "shard 3: samples 170-255" in result.out


def test_a_worker_killed_mid_run_is_retried_and_the_file_is_right(
    run_cli, tmp_path, digits_single
):
    data = _digits_copy(tmp_path / "calib")
    # Sample 140 is in shard 2 (128-255), in each of its 2 passes: killed in the first.
    worker_faults.write_fault(data, sample="s00140.npy", times=1)
    out = tmp_path / "ray.json"
    result = _calibrate(run_cli, out, "--tensors-per-pass", "6", "--ray", data=data)
    assert result.code == 0, result.err
    assert worker_faults.deaths(data) == 1  # the first attempt of shard 2 died halfway
    assert out.read_bytes() == digits_single.read_bytes()


def test_a_shard_that_keeps_dying_ends_the_run_with_no_file(run_cli, tmp_path):
    data = _digits_copy(tmp_path / "calib")
    worker_faults.write_fault(data, sample="s00064.npy")  # in shard 1, every attempt
    out = tmp_path / "out" / "ray.json"
    out.parent.mkdir()
    result = _calibrate(run_cli, out, "--ray", data=data)
    assert result.code == 3, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("Error: Shard 1 (samples 0-127) failed on the Ray cluster")
    assert "died 4 times" in lines[0] and "nothing was written" in lines[0]
    assert worker_faults.deaths(data) == 0  # no marker: `times` unbounded
    assert not list(out.parent.iterdir())


def test_ray_tasks_apply_the_users_sample_size_limit(run_cli, tmp_path, tiny_cnn):
    """Shard 2 holds a sample over --max-sample-bytes; its task refuses it, as one
    process would (the driver reads no sample when the tasks read the folder)."""
    data = tmp_path / "calib"
    kept = np.load(data / "s00020.npy")
    (data / "s00020.npy").unlink()
    np.savez(data / "s00020.npz", input=kept, pad=np.zeros(4096))
    out = tmp_path / "out.json"
    limit = (data / "s00000.npy").stat().st_size
    result = run_cli(
        "calibrate", tiny_cnn, "--data", data, "-o", out, "--max-sample-bytes", limit, "--ray"
    )
    assert result.code == 3, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert f"Sample '{data / 's00020.npz'}' unpacks to " in lines[0]
    assert f"over the limit of {limit:,}" in lines[0]
    assert not out.exists()


def test_bad_data_in_a_ray_task_names_the_sample(run_cli, tmp_path, tiny_cnn):
    bad = tmp_path / "calib" / "s00030.npy"
    bad.write_bytes(b"\x93NUMPY garbage")
    out = tmp_path / "out.json"
    result = run_cli("calibrate", tiny_cnn, "--data", tmp_path / "calib", "-o", out, "--ray")
    assert result.code == 3, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith(f"Error: Sample '{bad}' could not be read: ")
    assert not out.exists()


def test_one_progress_bar_counts_each_sample_once_across_a_retry(tmp_path, tiny_cnn):
    from qconvert.calibration.ray_backend import RayCluster

    advances, totals = [], []

    class Counting:
        @contextlib.contextmanager
        def task(self, description, total):
            totals.append(total)
            yield lambda: advances.append(1)

    worker_faults.write_fault(tmp_path / "calib", sample="s00010.npy", times=1)  # shard 1
    calibration = api.calibrate(
        tiny_cnn, tmp_path / "calib", ray=RayCluster(), tensors_per_pass=4, progress=Counting()
    )
    passes = calibration.split.passes
    assert passes > 1 and worker_faults.deaths(tmp_path / "calib") == 1
    assert totals == [32 * passes] and len(advances) == 32 * passes
    assert [record.shard.stop for record in calibration.split.shards] == [16, 32]
