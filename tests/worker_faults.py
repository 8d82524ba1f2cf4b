"""A calibration worker that dies mid-run, for the tests: SIGKILL, as the OOM killer sends.

`install()` runs in worker processes only (never in the test process): the Ray cluster's
`worker_process_setup_hook`, or the top of `calibrate_in_child.py`, which spawned local
workers import as their `__mp_main__`. It wraps `DirectorySource._sample`, so a worker
kills itself when it reads the sample that a data folder's `FAULT_FILE` names:

    {"sample": "s00140.npy", "times": 1}

`sample` null means the first sample this worker reads. `times` bounds how many workers
die of it (counted with marker files beside `FAULT_FILE`, so a retry then succeeds); null
means every time. A folder without `FAULT_FILE` is read as usual.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

FAULT_FILE = "worker-fault.json"


def write_fault(folder: Path, *, sample: str | None = None, times: int | None = None) -> Path:
    """Makes a worker that reads `sample` of `folder` die (`times` times, or always)."""
    path = Path(folder) / FAULT_FILE
    path.write_text(json.dumps({"sample": sample, "times": times}))
    return path


def deaths(folder: Path) -> int:
    """How many workers died of the fault in `folder`."""
    return len(list(Path(folder).glob(f"{FAULT_FILE}.death-*")))


def install() -> None:
    """Wraps `DirectorySource._sample` in this (worker) process."""
    from qconvert.dataset import DirectorySource

    read = DirectorySource._sample

    def sample(self, entry):
        fault = self.folder / FAULT_FILE
        if fault.exists():
            spec = json.loads(fault.read_text())
            if spec["sample"] in (None, Path(entry.source).name) and _claim(fault, spec):
                os.kill(os.getpid(), signal.SIGKILL)
        return read(self, entry)

    DirectorySource._sample = sample


def _claim(fault: Path, spec: dict) -> bool:
    """Whether this worker may still die: `times` is not used up (claimed atomically)."""
    if spec["times"] is None:
        return True
    for number in range(spec["times"]):
        try:
            os.close(os.open(f"{fault}.death-{number}", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        return True
    return False
