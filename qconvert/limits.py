"""How much an untrusted model or data set may ask of the machine, checked before reading.

Each bound is a command-line flag (`--max-tensor-bytes`, `--max-sample-bytes`,
`--max-image-pixels`); the defaults suit a machine with tens of GB of memory.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadLimits:
    """Bounds checked before a model's weights or a sample's values are read.

    Attributes:
        max_tensor_bytes: the most bytes one model tensor may declare (dims x element
            size). A file can declare a tensor far larger than memory; it is refused up
            front instead of failing (or swapping) halfway through a run.
        max_sample_bytes: the most bytes one sample file may unpack to. An `.npz` is a zip:
            a few kilobytes can decompress to gigabytes.
        max_image_pixels: the most pixels one image may have (width x height), checked from
            its header before it is decoded.
    """

    max_tensor_bytes: int = 16 * 2**30
    max_sample_bytes: int = 2 * 2**30
    max_image_pixels: int = 100_000_000


DEFAULT_LIMITS = LoadLimits()
