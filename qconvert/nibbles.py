"""Packing 4-bit codes two a byte, the low nibble first: onnxruntime's MatMulNBits layout.

The block quantizer (`blockwise`) writes its codes through these; nothing here knows about
blocks or scales, only about the bits of uint8 and uint32 arrays.
"""

from __future__ import annotations

import sys

import numpy as np
import numpy.typing as npt


def pack_nibbles(
    codes: npt.NDArray[np.uint8], axis: int = -1, *, flip: bool = False
) -> npt.NDArray[np.uint8]:
    """Two 4-bit codes (each below 16) a byte along `axis`, the first in the low nibble.

    With `flip`, each code's top bit is flipped first (c ^ 8: the two's-complement nibble
    of c - 8, an INT4 value). Pairs along a contiguous last axis are read as one
    little-endian uint16 each, so the packing is three passes over half as many values.
    """
    axis = axis % codes.ndim
    length = codes.shape[axis]
    if length % 2:
        pad = [(0, 0)] * codes.ndim
        pad[axis] = (0, 1)
        codes = np.pad(codes, pad, constant_values=8 if flip else 0)
    last = axis == codes.ndim - 1
    if last and codes.flags.c_contiguous and sys.byteorder == "little":
        pairs = codes.view(np.uint16)
        if flip:
            pairs = pairs ^ np.uint16(0x0808)
        packed = pairs >> 4
        packed |= pairs
        return packed.astype(np.uint8)
    low = [slice(None)] * codes.ndim
    high = list(low)
    low[axis], high[axis] = slice(0, None, 2), slice(1, None, 2)
    packed = np.left_shift(codes[tuple(high)], 4)
    packed |= codes[tuple(low)]
    if flip:
        packed ^= np.uint8(0x88)
    return packed


def unpack_nibbles(packed: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """The inverse of `pack_nibbles` along the last axis: (..., P) bytes -> (..., 2P) codes."""
    codes = np.empty((*packed.shape[:-1], 2 * packed.shape[-1]), dtype=np.uint8)
    np.bitwise_and(packed, 15, out=codes[..., 0::2])
    np.right_shift(packed, 4, out=codes[..., 1::2])
    return codes


_NIBBLE_EIGHTS = 0x8888
"""Four nibbles of 8: added once to four signed codes c - 8 packed as sum (c_j - 8) 16^j,
it gives the unsigned codes' packing sum c_j 16^j."""


def pack_transposed(
    chunk: npt.NDArray[np.float32], out: npt.NDArray[np.uint8], *, signed: bool
) -> None:
    """Writes 4-bit codes (R, C), R a multiple of 8, packed along R into `out` (C, R / 2).

    `chunk` holds whole-number floats: the codes, or with `signed` the codes minus 8
    (`blockwise._round_blocks`). Four codes along R are combined in float32, exact below 2**24:
    pairs as c0 + 16 c1, then pairs of those (times 256), which the unsigned cast needs
    only where the half-sized arrays are, never on the full chunk; the middle 8 of signed
    codes is added there once (`_NIBBLE_EIGHTS`). Two of those make one little-endian
    uint32 of eight codes (code j in bits 4j..4j+3: the four bytes `pack_nibbles` makes of
    them), so the transpose moves a quarter as many elements as a byte transpose would;
    numpy's strided copies cost per element, not per byte.
    """
    if sys.byteorder != "little":
        codes = chunk + np.float32(8) if signed else chunk
        out[...] = pack_nibbles(codes.astype(np.uint8), axis=0).T
        return
    pairs = np.multiply(chunk[1::2], np.float32(16))
    pairs += chunk[0::2]
    fours = np.multiply(pairs[1::2], np.float32(256))
    fours += pairs[0::2]
    if signed:
        fours += np.float32(_NIBBLE_EIGHTS)
    halves = fours.astype(np.uint32)
    words = np.left_shift(halves[1::2], np.uint32(16))
    words |= halves[0::2]
    out.view(np.uint32)[...] = words.T
