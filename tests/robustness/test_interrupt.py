"""Ctrl-C and SIGTERM during quantize: one line, exit 130/143, nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest

from robustness.signals import signals_as_from_a_terminal


def _slow_model(path):
    """Six 1024x1024 MatMul+Relu layers: tens of milliseconds per sample."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "input"
    for i in range(6):
        w = (rng.standard_normal((1024, 1024)) / 32).astype(np.float32)
        inits.append(onnx.numpy_helper.from_array(w, f"w{i}"))
        nodes.append(onnx.helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"mm{i}"))
        out = "output" if i == 5 else f"relu{i}"
        nodes.append(onnx.helper.make_node("Relu", [f"mm{i}"], [out], name=f"relu{i}"))
        x = out
    graph = onnx.helper.make_graph(
        nodes,
        "slow",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 64, 1024])],
        [onnx.helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [1, 64, 1024])],
        inits,
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path))


def _reads_from(pid: int, folder) -> bool:
    """Whether the process holds a file of `folder` open or mapped right now."""
    proc = f"/proc/{pid}"
    try:
        links = [os.readlink(f"{proc}/fd/{fd}") for fd in os.listdir(f"{proc}/fd")]
        with open(f"{proc}/maps") as maps:
            mapped = maps.read()
    except OSError:  # the fd closed between listing and reading: look again
        return False
    return any(link.startswith(str(folder)) for link in links) or str(folder) in mapped


def _wait_until_reading(process, calib, timeout_s: float = 300.0) -> None:
    """Waits until the run reads calibration samples, so the signal lands inside calibration.

    A fixed sleep was too short on a loaded machine, where importing alone can take seconds;
    at a load average of 20 on 2 cores, 120 s did not cover importing and loading.
    """
    if not os.path.isdir(f"/proc/{process.pid}"):  # no procfs: the old fixed wait
        time.sleep(4.0)
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        if _reads_from(process.pid, calib):
            return
        time.sleep(0.005)
    raise AssertionError("the run never started reading its calibration samples")


@pytest.mark.parametrize(
    ("signum", "code", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["sigint", "sigterm"],
)
def test_signal_during_calibration_leaves_nothing(tmp_path, signum, code, word):
    model = tmp_path / "slow.onnx"
    _slow_model(model)
    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "s00000.npy", np.ones((1, 64, 1024), np.float32))
    for i in range(1, 2000):  # the same sample many times: minutes of work, little disk
        os.symlink(calib / "s00000.npy", calib / f"s{i:05d}.npy")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qconvert",
            "quantize",
            str(model),
            "--data",
            str(calib),
            "-o",
            str(out_dir / "q.onnx"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=signals_as_from_a_terminal,
    )
    try:
        _wait_until_reading(process, calib)
        assert process.poll() is None, "the run ended before it could be interrupted"
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:  # a failed test leaves no run behind it, calibrating
            process.kill()
            process.communicate()
    assert process.returncode == code, err
    assert err.strip() == f"Error: {word}; no output was written."
    assert list(out_dir.iterdir()) == []


def test_an_error_raised_while_handling_an_interrupt_still_exits_130(run_cli, monkeypatch):
    # A signal can land inside a library that turns it into its own error; the run was
    # interrupted all the same, and must not be reported as a bug.
    from qconvert import api

    def interrupted_inside_a_library(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ValueError("read interrupted") from None

    monkeypatch.setattr(api, "inspect", interrupted_inside_a_library)
    result = run_cli("inspect", "model.onnx")
    assert result.code == 130
    assert result.err.strip() == "Error: interrupted; no output was written."
