"""Ranges as a TensorRT calibration cache, so one calibration also serves TensorRT users.

The cache is text: a header line `TRT-<version>-<algorithm>`, then one line per tensor,
`name: <scale>`, where the scale is amax / 127 (TensorRT's int8 activations are symmetric)
written as the big-endian hex of its float32 bits. For example amax 1.0 gives

    TRT-8601-EntropyCalibration2
    input: 3c010a14

TensorRT uses a cache only if the header's version and algorithm match the build's
calibrator (IInt8EntropyCalibrator2 reads `EntropyCalibration2`, IInt8MinMaxCalibrator
`MinMaxCalibration`); edit the version in the header to the TensorRT in use if it differs.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from qconvert.calibration.observers import TensorRange
from qconvert.model import write_atomically

TRT_VERSION = "8601"
_TINY = float(np.finfo(np.float32).tiny)


def trt_cache_text(ranges: Mapping[str, TensorRange], *, method: str) -> str:
    """The cache's text for `ranges`, derived with `method`."""
    algorithm = "MinMaxCalibration" if method == "minmax" else "EntropyCalibration2"
    lines = [f"TRT-{TRT_VERSION}-{algorithm}"]
    for name, tensor_range in ranges.items():
        amax = max(abs(tensor_range.min), abs(tensor_range.max))
        scale = np.float32(max(amax / 127.0, _TINY))
        lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
    return "\n".join(lines) + "\n"


def write_trt_cache(path: Path, ranges: Mapping[str, TensorRange], *, method: str) -> None:
    """Writes the cache atomically."""
    write_atomically(Path(path), trt_cache_text(ranges, method=method).encode("ascii"))
