"""Freed large blocks go back to the system (`memory.return_large_blocks`).

glibc raises its mmap threshold each time a mapped block is freed, so the copies
onnxruntime makes while it builds a session come back from the heap and stay resident
after the session is gone. Each case runs in a child process: the setting is
process-wide and lasts.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from qconvert import memory

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or memory._mallopt is None,
    reason="glibc's mallopt and /proc are Linux's",
)

_SESSIONS = """
import json, sys
import numpy as np
from qconvert import memory, runtime, testing

if sys.argv[1] == "glibc":
    memory._mallopt = None  # glibc's own moving threshold

def resident_mb():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20

rng = np.random.default_rng(0)
c = 512  # two 3x3 Convs, 18 MB of weights
model = testing.conv_relu_conv(
    rng.standard_normal((c, c, 3, 3)).astype(np.float32),
    np.zeros(c, np.float32),
    rng.standard_normal((c, c, 3, 3)).astype(np.float32),
).SerializeToString()
x = rng.standard_normal((1, c, 8, 8)).astype(np.float32)
before = resident_mb()
outputs = []
for _ in range(4):
    session = runtime.make_session(model)
    outputs.append(session.run(None, {"input": x})[0])
    del session
print(json.dumps({
    "kept_mb": resident_mb() - before,
    "weights_mb": len(model) / 2**20,
    "output": outputs[-1].tobytes().hex(),
}))
"""


def _sessions(mode: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _SESSIONS, mode],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin"},  # no MALLOC_MMAP_THRESHOLD_ from the caller
    )
    return json.loads(done.stdout)


def test_sessions_built_and_dropped_leave_their_copies_behind_no_more():
    fixed, moving = _sessions("fixed"), _sessions("glibc")

    # With glibc's moving threshold, four sessions built and dropped keep their copies
    # of the weights resident (71 to 89 MB for 18 MB of weights); with the threshold
    # fixed, what stays is onnxruntime's own set-up (8.5 MB), done once.
    assert moving["kept_mb"] > 2 * moving["weights_mb"]
    assert fixed["kept_mb"] < 0.75 * fixed["weights_mb"]
    assert fixed["output"] == moving["output"]  # the same numbers, bit for bit


def test_a_threshold_the_user_set_is_left_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "_mallopt", lambda *args: calls.append(args) or 1)
    monkeypatch.setattr(memory, "_large_blocks_returned", False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    memory.return_large_blocks()
    assert calls == []

    monkeypatch.setattr(memory, "_large_blocks_returned", False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    memory.return_large_blocks()
    memory.return_large_blocks()  # once per process
    assert calls == [(memory._M_MMAP_THRESHOLD, memory.MMAP_THRESHOLD_BYTES)]
