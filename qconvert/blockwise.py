"""Blocked weight quantization: one scale (and zero point) per block along the reduction axis.

A weight W of a MatMul `y = x @ W` has shape (K, N): K is the reduction axis. Its transpose
(N, K) is cut into blocks of `block_size` consecutive values along K; each block gets its
own scale s (and zero point z), and each value an unsigned `bits`-bit code c:

    w ~ (c - z) * s            computed in float32: (float(c) - float(z)) * s

which is how onnxruntime's MatMulNBits, GatherBlockQuantized and blocked DequantizeLinear
read them, so a dequantized copy made here equals the runtime's bit for bit.

- Symmetric (the default): z = 2**(bits-1) (8 for 4 bits), and s maps the block's value of
  largest magnitude onto the code 0, i.e. onto -8: s = w_peak / -8, signed. The sign lets the
  peak use the wider negative side of [-8, 7] whichever sign it has (onnxruntime's own RTN
  does the same).
- Asymmetric: the block's range [min(w, 0), max(w, 0)] spans the codes [0, 15]:
  s = (max - min) / 15, z = round(-min / s).

`search` shrinks each block's range by the factor in `SHRINK_GRID` that gives the least
squared error for that block (an MSE search of the scale); 1.0 is in the grid, so it never
does worse than round-to-nearest.

On an int8 grid (`units`), every block scale of output column n is a whole multiple
m * u_n of one unit per column, u_n = max|w_n| / 120, with m in +-1..15 (the sign as the
signed scale's). Then (c - 8) * m is an exact int8 (|-8 * 15| = 120 <= 127), and the weight
is that int8 times u_n: the form an int8 GEMM with per-column scales reads
(`passes.int4`'s int8 kernel). The block's range rounds to the nearest multiple, so a
block's step moves by at most half a unit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from qconvert.nibbles import pack_nibbles, pack_transposed, unpack_nibbles
from qconvert.split_work import run_split

BLOCK_SIZES = (16, 32, 64, 128, 256)
"""Block sizes onnxruntime's MatMulNBits and GatherBlockQuantized accept (powers of two,
at least 16); the command line offers 32, 64 and 128."""

INT8_UNIT_STEPS = 120
"""max|w| of a column spans this many units on the int8 grid: 8 codes times 15."""

MAX_MULTIPLIER = 15
"""The largest block multiplier on the int8 grid."""

SHRINK_GRID = tuple(round(1.0 - 0.025 * i, 3) for i in range(17))
"""Range factors the MSE search tries, 1.0 down to 0.6."""


@dataclass(frozen=True, slots=True, eq=False)
class BlockQuantized:
    """A weight quantized in blocks along its reduction axis.

    The codes are given either plain (`code_array`) or, for 4 bits, only as MatMulNBits'
    packed bytes (`packed`, what round-to-nearest makes: packing inside the rounding spares
    a full-size code array and a byte transpose); `codes` unpacks those on each read.

    Attributes:
        scales: float32 (N, k_blocks).
        zero_points: uint8 (N, k_blocks).
        k: the reduction size K.
        block_size: values per block.
        bits: 4 or 8.
        symmetric: the zero point is the middle code 2**(bits-1) everywhere.
        units: float32 (N,) on the int8 grid (module docstring): every scale is a whole
            multiple of its column's unit; else None.
        code_array: uint8 (N, k_blocks * block_size), unsigned codes in [0, 2**bits); the
            tail past K (when K is not a multiple of the block size) holds the zero point.
            None when `packed` is given.
        packed: uint8 (N, k_blocks * block_size / 2), 4-bit codes two a byte along K, the
            first in the low nibble; None when `code_array` is given.
    """

    scales: npt.NDArray[np.float32]
    zero_points: npt.NDArray[np.uint8]
    k: int
    block_size: int
    bits: int
    symmetric: bool
    units: npt.NDArray[np.float32] | None = None
    code_array: npt.NDArray[np.uint8] | None = None
    packed: npt.NDArray[np.uint8] | None = None

    @property
    def codes(self) -> npt.NDArray[np.uint8]:
        """uint8 (N, k_blocks * block_size) codes, the padded tail (zero points) included."""
        if self.code_array is not None:
            return self.code_array
        return unpack_nibbles(self.packed)

    @property
    def n(self) -> int:
        """The output size N."""
        return int(self.scales.shape[0])

    @property
    def k_blocks(self) -> int:
        """Blocks per output column."""
        return int(self.scales.shape[1])

    def dequantize(self) -> npt.NDArray[np.float32]:
        """The float weight these codes stand for, (N, K), as the runtime computes it."""
        codes = self.codes.reshape(self.n, self.k_blocks, self.block_size).astype(np.float32)
        shifted = codes - self.zero_points.astype(np.float32)[:, :, None]
        values = shifted * self.scales[:, :, None]
        return values.reshape(self.n, -1)[:, : self.k]

    def multipliers(self) -> npt.NDArray[np.int8]:
        """(N, k_blocks) whole multiples m with scale = m * unit (int8 grid only)."""
        units = self.units[:, None]
        safe = np.where(units == 0, 1.0, units)
        return np.round(self.scales / safe).astype(np.int8)

    def int8_weight(self) -> npt.NDArray[np.int8]:
        """(N, K) int8 values (c - z) * m: the weight is these times the column's unit."""
        codes = self.codes.reshape(self.n, self.k_blocks, self.block_size).astype(np.int16)
        shifted = codes - self.zero_points.astype(np.int16)[:, :, None]
        values = shifted * self.multipliers().astype(np.int16)[:, :, None]
        return values.reshape(self.n, -1)[:, : self.k].astype(np.int8)

    def signed_codes(self) -> npt.NDArray[np.int8]:
        """Codes minus the zero point, (N, K): the INT4 values of a symmetric weight."""
        middle = 1 << (self.bits - 1)
        return (self.codes[:, : self.k].astype(np.int16) - middle).astype(np.int8)


def levels(bits: int) -> int:
    """The largest unsigned code: 15 for 4 bits."""
    return (1 << bits) - 1


def pad_blocks(wt: npt.NDArray[np.float32], block_size: int) -> npt.NDArray[np.float32]:
    """(N, K) -> (N, k_blocks, block_size), the tail padded with zeros."""
    n, k = wt.shape
    k_blocks = -(-k // block_size)
    padded = np.zeros((n, k_blocks * block_size), dtype=np.float32)
    padded[:, :k] = wt
    return padded.reshape(n, k_blocks, block_size)


def block_params(
    blocks: npt.NDArray[np.float32],
    *,
    bits: int,
    symmetric: bool,
    shrink: float | npt.NDArray[np.float32] = 1.0,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """Scales and zero points of blocks (..., block_size), their range shrunk by `shrink`.

    `shrink` is a number or an array broadcasting to the blocks' leading shape. An all-zero
    block gets scale 0, which dequantizes it to zeros exactly.
    """
    return range_params(
        blocks.max(axis=-1), blocks.min(axis=-1), bits=bits, symmetric=symmetric, shrink=shrink
    )


def range_params(
    high: npt.NDArray[np.float32],
    low: npt.NDArray[np.float32],
    *,
    bits: int,
    symmetric: bool,
    shrink: float | npt.NDArray[np.float32] = 1.0,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """Scales and zero points of blocks whose largest and smallest values are given."""
    top = levels(bits)
    middle = 1 << (bits - 1)
    if symmetric:
        peak = np.where(np.abs(high) > np.abs(low), high, low)
        scales = (peak * shrink / -middle).astype(np.float32)
        zero_points = np.full(scales.shape, middle, dtype=np.uint8)
        return scales, zero_points
    low = np.minimum(low, 0.0) * shrink
    high = np.maximum(high, 0.0) * shrink
    scales = ((high - low) / top).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        zero = np.where(scales == 0, middle, np.round(-low / scales))
    zero_points = np.clip(zero, 0, top).astype(np.uint8)
    return scales, zero_points


def column_units(wt: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The int8 grid's unit of each row of (N, K): max|w| / INT8_UNIT_STEPS."""
    return (np.abs(wt).max(axis=1) / INT8_UNIT_STEPS).astype(np.float32)


def quantize_columns_int8(wt: npt.NDArray[np.float32]) -> BlockQuantized:
    """A weight (N, K) as int8 with one positive scale per output column (8 bits, no blocks).

    What the int8 kernel reads for a layer kept at 8 bits: max|w| of each column maps to
    127, the codes are the int8 values plus 128, and the scale is also the column's unit
    (every multiplier 1), so `int8_weight` gives the int8 values.
    """
    n, k = wt.shape
    units = (np.abs(wt).max(axis=1) / 127).astype(np.float32)
    safe = np.where(units == 0, np.float32(1.0), units)
    values = np.clip(np.rint(np.asarray(wt, np.float32) / safe[:, None]), -127, 127)
    return BlockQuantized(
        code_array=(values + 128).astype(np.uint8),
        scales=units[:, None].copy(),
        zero_points=np.full((n, 1), 128, dtype=np.uint8),
        k=k,
        block_size=k,
        bits=8,
        symmetric=True,
        units=units,
    )


def snap_scales(
    scales: npt.NDArray[np.float32], units: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """Signed scales (N, ...) moved to the nearest whole multiple of their row's unit.

    The multiple is at least 1 in size (a block of tiny values keeps a step of one unit)
    and at most MAX_MULTIPLIER; a row of zeros (unit 0) keeps scale 0.
    """
    units = units.reshape(units.shape + (1,) * (scales.ndim - 1))
    safe = np.where(units == 0, 1.0, units)
    size = np.clip(np.round(np.abs(scales) / safe), 1, MAX_MULTIPLIER)
    sign = np.where(scales < 0, -1.0, 1.0)
    return np.where(units == 0, 0.0, sign * size * units).astype(np.float32)


def codes_for(
    blocks: npt.NDArray[np.float32],
    scales: npt.NDArray[np.float32],
    zero_points: npt.NDArray[np.uint8],
    *,
    bits: int,
) -> npt.NDArray[np.uint8]:
    """The nearest codes of blocks (..., block_size) under the given parameters."""
    safe = np.where(scales == 0, 1.0, scales).astype(np.float32)[..., None]
    steps = np.round(blocks / safe) + zero_points[..., None].astype(np.float32)
    steps = np.where(scales[..., None] == 0, zero_points[..., None], steps)
    return np.clip(steps, 0, levels(bits)).astype(np.uint8)


def dequantize_blocks(
    codes: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.float32],
    zero_points: npt.NDArray[np.uint8],
) -> npt.NDArray[np.float32]:
    """(codes - zero point) * scale in float32, blocks (..., block_size)."""
    shifted = codes.astype(np.float32) - zero_points[..., None].astype(np.float32)
    return shifted * scales[..., None]


CHUNK_VALUES = 1 << 22
"""The MSE search quantizes weights this many values (16 MB of float32) at a time, so the
temporaries stay small beside a weight of any size."""

NEAREST_CHUNK_VALUES = 1 << 18
"""Round-to-nearest works on 1 MB of float32 at a time: its half-dozen passes over a
chunk then run in the CPU's cache instead of memory."""


def quantize_rtn(
    wt: npt.NDArray[np.float32],
    *,
    block_size: int,
    bits: int = 4,
    symmetric: bool = True,
    search: bool = False,
    importance: npt.NDArray[np.floating] | None = None,
    units: npt.NDArray[np.float32] | None = None,
    threads: int | None = None,
) -> BlockQuantized:
    """Round-to-nearest blocked quantization of a weight given as (N, K).

    With `search`, each block's range is first shrunk by the factor of `SHRINK_GRID` that
    gives it the least squared error; with `importance` (K,), the error of each position
    along K weighs that much (an input's mean square on the data: AWQ's activation-aware
    clipping), and the search is implied. `wt` may be a strided view (a transposed,
    memory-mapped weight): it is read a few rows at a time. With `units` (N,), symmetric
    only, the scales are snapped to the int8 grid (module docstring) after any search.
    Plain round-to-nearest runs on `threads` threads (default: `split_work`'s), with the
    same result whatever their number.
    """
    if not search and importance is None and units is None:
        return _nearest(
            wt, block_size=block_size, bits=bits, symmetric=symmetric, threads=threads
        )
    n, k = wt.shape
    k_blocks = -(-k // block_size)
    weights = None
    if importance is not None:
        weights = np.zeros(k_blocks * block_size, dtype=np.float32)
        weights[:k] = importance
        weights = weights.reshape(k_blocks, block_size)
    codes = np.empty((n, k_blocks * block_size), dtype=np.uint8)
    scales = np.empty((n, k_blocks), dtype=np.float32)
    zero_points = np.empty((n, k_blocks), dtype=np.uint8)
    rows = max(1, CHUNK_VALUES // (k_blocks * block_size))
    for start in range(0, n, rows):
        end = min(start + rows, n)
        blocks = pad_blocks(np.asarray(wt[start:end], dtype=np.float32), block_size)
        shrink = (
            best_shrink(blocks, bits=bits, symmetric=symmetric, importance=weights)
            if search or importance is not None
            else 1.0
        )
        s, z = block_params(blocks, bits=bits, symmetric=symmetric, shrink=shrink)
        if units is not None:
            s = snap_scales(s, units[start:end])
        codes[start:end] = codes_for(blocks, s, z, bits=bits).reshape(end - start, -1)
        scales[start:end], zero_points[start:end] = s, z
    return BlockQuantized(
        code_array=codes,
        scales=scales,
        zero_points=zero_points,
        k=k,
        block_size=block_size,
        bits=bits,
        symmetric=symmetric,
        units=units,
    )


def column_chunks(
    stored: npt.NDArray[np.float32],
    block_size: int,
    blocks: tuple[int, int] | None = None,
) -> Iterator[tuple[slice, slice, npt.NDArray[np.float32]]]:
    """A (K, N) weight in cache-sized chunks: (block rows, columns, scratch copy).

    Each chunk holds whole blocks of `block_size` rows (the last one zero-padded past K)
    over a run of columns, copied once into a float32 scratch array the caller may round
    in place; the first slice indexes the padded rows, the second the columns. With
    `blocks` (start, stop), only those blocks along K are walked.
    """
    k, n = stored.shape
    first, k_blocks = blocks if blocks is not None else (0, -(-k // block_size))
    width = min(n, max(1, NEAREST_CHUNK_VALUES // block_size))
    step = max(1, NEAREST_CHUNK_VALUES // (block_size * width))
    for b0 in range(first, k_blocks, step):
        b1 = min(b0 + step, k_blocks)
        k0, k1 = b0 * block_size, min(b1 * block_size, k)
        for c0 in range(0, n, width):
            c1 = min(c0 + width, n)
            chunk = np.empty(((b1 - b0) * block_size, c1 - c0), dtype=np.float32)
            chunk[: k1 - k0] = stored[k0:k1, c0:c1]
            chunk[k1 - k0 :] = 0.0  # the last block's tail past K
            yield slice(b0 * block_size, b1 * block_size), slice(c0, c1), chunk


def row_chunks(
    wt: npt.NDArray[np.float32], block_size: int, rows: tuple[int, int] | None = None
) -> Iterator[tuple[slice, npt.NDArray[np.float32]]]:
    """An (N, K) weight in cache-sized runs of rows: (rows, scratch copy).

    Each scratch copy is float32, zero-padded along K to whole blocks. With `rows`
    (start, stop), only those rows are walked.
    """
    n, k = wt.shape
    first, last = rows if rows is not None else (0, n)
    padded = -(-k // block_size) * block_size
    step = max(1, NEAREST_CHUNK_VALUES // padded)
    for r0 in range(first, last, step):
        r1 = min(r0 + step, last)
        chunk = np.empty((r1 - r0, padded), dtype=np.float32)
        chunk[:, :k] = wt[r0:r1]
        chunk[:, k:] = 0.0  # the last block's tail past K
        yield slice(r0, r1), chunk


def _nearest(
    wt: npt.NDArray[np.float32],
    *,
    block_size: int,
    bits: int,
    symmetric: bool,
    threads: int | None = None,
) -> BlockQuantized:
    """Round-to-nearest in the layout the weight is stored in, a cache-sized chunk at a time.

    A MatMul weight is stored (K, N), so `wt` is its transposed view: then the blocks are
    runs of `block_size` rows of the stored array, reduced row against row (contiguous
    reads, no transposed copy of the floats). Each chunk is copied once into a scratch
    buffer and rounded there in place: the same values and the same float32 operations as
    `block_params` and `codes_for`, so the same codes. 4-bit codes are packed and turned into
    the (N, K / 2) bytes MatMulNBits reads while the chunk is still in cache: a byte
    transpose of the whole packed weight afterwards is a strided walk through memory that
    costs more than the rounding itself. The chunks are shared out among `threads` threads
    (`split_work`), each a contiguous run of them: blocks along K of a stored (K, N) weight,
    rows of an (N, K) one, so each reads its own stretch of the file.
    """
    n, k = wt.shape
    k_blocks = -(-k // block_size)
    padded = k_blocks * block_size
    four = bits == 4
    codes = np.empty((n, padded // 2 if four else padded), dtype=np.uint8)
    if wt.T.flags.c_contiguous and not wt.flags.c_contiguous:
        stored = wt.T  # (K, N)
        scales = np.empty((k_blocks, n), dtype=np.float32)
        zero_points = np.empty((k_blocks, n), dtype=np.uint8)

        def blocks_along_k(first: int, last: int) -> None:
            for rows, columns, chunk in column_chunks(stored, block_size, (first, last)):
                blocks = chunk.reshape(-1, block_size, chunk.shape[1])
                in_blocks = slice(rows.start // block_size, rows.stop // block_size)
                s, z = _round_blocks(
                    blocks, 1, bits=bits, symmetric=symmetric, signed=four and symmetric
                )
                scales[in_blocks, columns], zero_points[in_blocks, columns] = s, z
                if four:
                    out = codes[columns, rows.start // 2 : rows.stop // 2]
                    pack_transposed(chunk, out, signed=symmetric)
                else:
                    np.copyto(codes[columns, rows], chunk.T, "unsafe")

        run_split(blocks_along_k, k_blocks, threads=threads)
        scales, zero_points = (
            np.ascontiguousarray(scales.T),
            np.ascontiguousarray(zero_points.T),
        )
    else:
        scales = np.empty((n, k_blocks), dtype=np.float32)
        zero_points = np.empty((n, k_blocks), dtype=np.uint8)

        def runs_of_rows(first: int, last: int) -> None:
            for rows, chunk in row_chunks(wt, block_size, (first, last)):
                if four and block_size % 8 == 0:
                    # one block a column: reduced across rows and packed as above; a
                    # reduction along a short last axis costs ten times as much per value
                    columns = np.ascontiguousarray(chunk.reshape(-1, block_size).T)
                    s, z = _round_blocks(
                        columns[None], 1, bits=bits, symmetric=symmetric, signed=symmetric
                    )
                    scales[rows], zero_points[rows] = (
                        s.reshape(-1, k_blocks),
                        z.reshape(-1, k_blocks),
                    )
                    out = codes[rows].reshape(-1, block_size // 2)
                    pack_transposed(columns, out, signed=symmetric)
                    continue
                blocks = chunk.reshape(chunk.shape[0], k_blocks, block_size)
                scales[rows], zero_points[rows] = _round_blocks(
                    blocks, 2, bits=bits, symmetric=symmetric
                )
                if four:
                    codes[rows] = pack_nibbles(chunk.astype(np.uint8))
                else:
                    np.copyto(codes[rows], chunk, "unsafe")

        run_split(runs_of_rows, n, threads=threads)
    return BlockQuantized(
        scales=scales,
        zero_points=zero_points,
        k=k,
        block_size=block_size,
        bits=bits,
        symmetric=symmetric,
        code_array=None if four else codes,
        packed=codes if four else None,
    )


def _round_blocks(
    blocks: npt.NDArray[np.float32],
    axis: int,
    *,
    bits: int,
    symmetric: bool,
    signed: bool = False,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """Replaces `blocks` (blocks along `axis`) by their codes, as floats; returns the params.

    With `signed` (symmetric only), the codes are left minus their zero point, in
    [-2**(bits-1), 2**(bits-1) - 1]: the packer adds it back on fewer values. A block of
    scale 0 is all zeros, so dividing it by 1 gives its zero point as code.
    """
    high, low = blocks.max(axis=axis), blocks.min(axis=axis)
    middle = 1 << (bits - 1)
    if symmetric:
        # range_params' peak and scale in fewer passes over the (small) block arrays:
        # |high| > |low| is high > -low (high >= low), and x * 1.0 is x
        scales = np.where(high > -low, high, low)
        scales /= np.float32(-middle)
        zero_points = np.full(scales.shape, middle, dtype=np.uint8)
    else:
        scales, zero_points = range_params(high, low, bits=bits, symmetric=False)
    safe = np.where(scales == 0, np.float32(1.0), scales)
    np.divide(blocks, np.expand_dims(safe, axis), out=blocks)
    np.rint(blocks, out=blocks)
    if symmetric and signed:
        # not only the top: a subnormal peak's scale rounds, so a value may pass -8.5
        np.clip(blocks, -middle, middle - 1, out=blocks)
        return scales, zero_points
    if symmetric:
        blocks += np.float32(middle)
    else:
        blocks += np.expand_dims(zero_points, axis).astype(np.float32)
    np.clip(blocks, 0, levels(bits), out=blocks)
    return scales, zero_points


def best_shrink(
    blocks: npt.NDArray[np.float32],
    *,
    bits: int,
    symmetric: bool,
    importance: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.float32]:
    """Per block, the factor of `SHRINK_GRID` whose range gives the least squared error.

    `importance` (k_blocks, block_size) weighs each position's squared error.
    """
    best = np.ones(blocks.shape[:-1], dtype=np.float32)
    best_error = np.full(blocks.shape[:-1], np.inf, dtype=np.float64)
    for factor in SHRINK_GRID:
        scales, zero_points = block_params(
            blocks, bits=bits, symmetric=symmetric, shrink=factor
        )
        codes = codes_for(blocks, scales, zero_points, bits=bits)
        error = np.square(dequantize_blocks(codes, scales, zero_points) - blocks)
        if importance is not None:
            error = error * importance
        error = error.sum(axis=-1)
        better = error < best_error
        best = np.where(better, np.float32(factor), best)
        best_error = np.where(better, error, best_error)
    return best


def packed_codes(quantized: BlockQuantized) -> npt.NDArray[np.uint8]:
    """The 4-bit codes (N, k_blocks * block_size) packed two a byte along K, contiguous.

    Codes kept in the (K, N) layout (`grid_rounding`) are packed row pair by row pair
    there, and only the packed bytes are transposed.
    """
    if quantized.packed is not None:
        return quantized.packed
    codes = quantized.codes
    if codes.T.flags.c_contiguous and not codes.flags.c_contiguous:
        return np.ascontiguousarray(pack_nibbles(codes.T, axis=0).T)
    return np.ascontiguousarray(pack_nibbles(codes))


def matmul_nbits_inputs(
    quantized: BlockQuantized,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32], npt.NDArray[np.uint8] | None]:
    """B, scales and zero_points as com.microsoft MatMulNBits reads them.

    B is (N, k_blocks, block_size * bits / 8), codes packed low nibble first; scales are
    (N * k_blocks,); zero points, omitted when symmetric (the runtime's default is the
    middle code), are (N * ceil(k_blocks * bits / 8),), packed the same way per column.
    """
    n, k_blocks, size = quantized.n, quantized.k_blocks, quantized.block_size
    four = quantized.bits == 4
    if four:
        packed = packed_codes(quantized).reshape(n, k_blocks, size // 2)
    else:
        packed = quantized.codes.reshape(n, k_blocks, size)
    zero_points = None
    if not quantized.symmetric:
        zero_points = quantized.zero_points
        zero_points = (pack_nibbles(zero_points) if four else zero_points).reshape(-1)
    return packed, quantized.scales.reshape(-1), zero_points
