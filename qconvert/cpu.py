"""Facts about the CPU qconvert runs on that change what the best int8 options are."""

from __future__ import annotations

import os
import platform
from pathlib import Path

_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the system tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_flags() -> frozenset[str] | None:
    """The CPU feature flags from /proc/cpuinfo, or None where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return None


def lacks_vnni() -> bool:
    """True on an x86 CPU known to lack VNNI (AVX512-VNNI or AVX-VNNI).

    Without VNNI, onnxruntime's u8 x s8 kernels add pairs of products in int16
    (vpmaddubsw), which saturates for large weights; 7-bit weights (`--reduce-range`)
    avoid it. Other architectures, and CPUs whose flags cannot be read, are not flagged.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
        return False
    flags = cpu_flags()
    return flags is not None and not (flags & _VNNI_FLAGS)
