"""Reading one `.npy` sample fast: calibration folders hold thousands of small ones.

`np.load` parses every file's header with `ast.literal_eval`, which costs as much as
reading a small sample's data: on a folder of 16x16 digits it doubled calibration time.
The header of a folder's samples is the same text file after file, so it is parsed once
and the array is read straight into its buffer. Anything unusual (an unknown format
version, Fortran order, object arrays, a short file) goes to `np.load`, which gives the
error or the array.
"""

from __future__ import annotations

import ast
import functools
import math
import os
from pathlib import Path

import numpy as np

_MAGIC = b"\x93NUMPY"
# (version, length of the header-length field)
_HEADER_LENGTH_BYTES = {1: 2, 2: 4, 3: 4}


class TooLargeError(ValueError):
    """The array would take more bytes than allowed."""

    def __init__(self, size: int) -> None:
        super().__init__(f"{size} bytes")
        self.size = size


def read_npy(path: str | os.PathLike[str], max_bytes: int) -> np.ndarray:
    """The array `path` holds.

    Raises:
        TooLargeError: the file is larger than `max_bytes`, checked before reading it.
        ValueError, OSError, EOFError: as `np.load` (no pickles are loaded).
    """
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size > max_bytes:
            raise TooLargeError(size)
        data = bytearray(size)  # writable: readers may edit a sample in place
        read = file.readinto(data)
    layout = _layout(bytes(data[:16])) if read == size else None
    if layout is not None:
        start, header_length = layout
        parsed = _parsed_header(bytes(data[start : start + header_length]))
        if parsed is not None:
            dtype, shape = parsed
            offset = start + header_length
            count = math.prod(shape)
            if offset + count * dtype.itemsize == size:
                return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(
                    shape
                )
    return np.load(Path(path), allow_pickle=False)


def _layout(prefix: bytes) -> tuple[int, int] | None:
    """(where the header text starts, its length), for the format versions known."""
    if len(prefix) < 12 or not prefix.startswith(_MAGIC):
        return None
    field = _HEADER_LENGTH_BYTES.get(prefix[6])
    if field is None:
        return None
    start = 8 + field
    return start, int.from_bytes(prefix[8:start], "little")


@functools.lru_cache(maxsize=64)
def _parsed_header(text: bytes) -> tuple[np.dtype, tuple[int, ...]] | None:
    """(dtype, shape) of a plain C-ordered array's header, else None."""
    try:
        header = ast.literal_eval(text.decode("latin1"))
        dtype = np.dtype(header["descr"])
        shape = tuple(int(d) for d in header["shape"])
        fortran = header["fortran_order"]
    except (ValueError, SyntaxError, TypeError, KeyError, UnicodeDecodeError):
        return None
    if fortran is not False or dtype.hasobject or any(d < 0 for d in shape):
        return None
    return dtype, shape
