"""`qconvert` run as a script whose spawned calibration workers carry `worker_faults`.

The spawn start method imports the parent's main script in each child as `__mp_main__`,
so the fault is installed in every spawned worker and never in this driver process.

    python tests/calibrate_in_child.py calibrate MODEL --data DIR --workers 2 ...
"""

from __future__ import annotations

import sys

import worker_faults

if __name__ == "__main__":
    from qconvert.cli import main

    sys.exit(main())
else:
    worker_faults.install()
