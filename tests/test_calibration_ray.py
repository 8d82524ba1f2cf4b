"""Calibration on a real local Ray cluster (loopback only): the single-process file, always.

One cluster serves the module; `qconvert calibrate --ray` finds it initialized in this
process and uses it as it is.
"""

from __future__ import annotations

import contextlib
import os

import pytest
from conftest import SAMPLES

from qconvert import api
from qconvert.calibration.parallel import KILL_SHARD_ENV

pytestmark = pytest.mark.slow

DIGITS = SAMPLES / "digits_cnn"


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """A 2-CPU Ray cluster bound to loopback, for the whole module.

    Ray resolves 127.0.0.1 to the machine's outward address unless told that this is a
    single-machine cluster, which must be said before Ray is imported; its processes
    inherit it.
    """
    before = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
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


def _calibrate(run_cli, out, *options):
    return run_cli(
        "calibrate", DIGITS / "model.onnx", "--data", DIGITS / "calib", "-o", out, *options
    )


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
    run_cli, tmp_path, digits_single, monkeypatch
):
    marker = tmp_path / "killed-once"
    monkeypatch.setenv(KILL_SHARD_ENV, f"1:{marker}")
    out = tmp_path / "ray.json"
    result = _calibrate(run_cli, out, "--tensors-per-pass", "6", "--ray")
    assert result.code == 0, result.err
    assert marker.exists()  # the first attempt of shard 2 died halfway through
    assert out.read_bytes() == digits_single.read_bytes()


def test_a_shard_that_keeps_dying_ends_the_run_with_no_file(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv(KILL_SHARD_ENV, "0")
    out = tmp_path / "ray.json"
    result = _calibrate(run_cli, out, "--ray")
    assert result.code == 3, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("Error: Shard 1 (samples 0-127) failed on the Ray cluster")
    assert "died 4 times" in lines[0] and "nothing was written" in lines[0]
    assert not out.exists()
    assert not list(tmp_path.iterdir())


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


def test_one_progress_bar_counts_each_sample_once_across_a_retry(
    tmp_path, tiny_cnn, monkeypatch
):
    from qconvert.calibration.ray_backend import RayCluster

    advances, totals = [], []

    class Counting:
        @contextlib.contextmanager
        def task(self, description, total):
            totals.append(total)
            yield lambda: advances.append(1)

    monkeypatch.setenv(KILL_SHARD_ENV, f"0:{tmp_path / 'killed-once'}")
    calibration = api.calibrate(
        tiny_cnn, tmp_path / "calib", ray=RayCluster(), tensors_per_pass=4, progress=Counting()
    )
    passes = calibration.split.passes
    assert passes > 1 and (tmp_path / "killed-once").exists()
    assert totals == [32 * passes] and len(advances) == 32 * passes
    assert [record.shard.stop for record in calibration.split.shards] == [16, 32]
