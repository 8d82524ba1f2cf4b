"""The int8 kernel's no-data rounding of 4-bit weights: a fused range search, then the grid.

The int8 kernel (`passes.int4`) reads every block scale as a whole multiple 1..15 of its
column's unit (`blockwise`'s int8 grid). Snapping round-to-nearest's scale to the nearest
multiple moves a block's step by up to half a unit: on a 6-layer sentence encoder (block 32, no
data) that scores cosine 0.9541 against onnxruntime RTN's 0.9602 on MatMulNBits. What makes up
for it is what `--scale-search` does: each block's range shrunk by the factor of `SHRINK_GRID`
with the least squared error, then the scale snapped to the grid (0.9604 with the embeddings
left to nearest). Choosing the multiple by the block's error after the snap (every multiple, or
floor against ceil) lowers the weights' squared error further but scores lower end to end
(0.9578, 0.956): the shrink the search picks clips a block's few largest values, which the
snapped choice keeps.

`--scale-search` runs that search through `blockwise.best_shrink` (float64 errors, a
dequantized copy per factor), 12 s of that encoder's 16.5 s quantize. Here the same search runs
fused, in float32, on a cache-sized chunk at a time: the block is divided once by its
round-to-nearest scale s0 (t = w / s0, in [-8, 8]), and a factor f costs
|clip(rint(t / f), -8, 7) * f - t|^2 summed per block, five passes in the cache, in the
weight's stored layout (no transposed copy of the floats). The factor chosen differs from
`best_shrink`'s only where two factors' errors tie within float32 rounding.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from qconvert.blockwise import (
    MAX_MULTIPLIER,
    SHRINK_GRID,
    BlockQuantized,
    column_chunks,
    column_units,
    row_chunks,
)
from qconvert.split_work import run_split

_MIDDLE = 8
"""The symmetric 4-bit zero point: codes [0, 15] stand for [-8, 7]."""


def quantize_grid_searched(
    wt: npt.NDArray[np.float32], *, block_size: int, threads: int | None = None
) -> BlockQuantized:
    """A weight (N, K) on the int8 grid, each block's range searched first (module docstring).

    `wt` may be the transposed view of a MatMul weight stored (K, N): it is then read in that
    layout, a chunk of rows at a time (as `blockwise._nearest` reads it), and its codes are
    kept (K, N) too, `codes` being their transposed view: the int8 kernel reads them so.
    The chunks are shared out among `threads` threads (`split_work`), with the same result
    whatever their number.
    """
    n, k = wt.shape
    units = column_units(wt)
    k_blocks = -(-k // block_size)
    padded = k_blocks * block_size
    stored = wt.T if wt.T.flags.c_contiguous and not wt.flags.c_contiguous else None
    safe_units = np.where(units == 0, np.float32(1.0), units)
    if stored is not None:  # (K, N): blocks are runs of rows, columns the outputs
        codes = np.empty((padded, n), dtype=np.uint8)
        scales = np.empty((k_blocks, n), dtype=np.float32)

        def blocks_along_k(first: int, last: int) -> None:
            for rows, columns, chunk in column_chunks(stored, block_size, (first, last)):
                blocks = chunk.reshape(-1, block_size, chunk.shape[1])
                in_blocks = slice(rows.start // block_size, rows.stop // block_size)
                scales[in_blocks, columns] = _round_searched(blocks, 1, safe_units[columns])
                np.copyto(codes[rows, columns], chunk, "unsafe")

        run_split(blocks_along_k, k_blocks, threads=threads)
        codes, scales = codes.T, np.ascontiguousarray(scales.T)
    else:
        codes = np.empty((n, padded), dtype=np.uint8)
        scales = np.empty((n, k_blocks), dtype=np.float32)

        def runs_of_rows(first: int, last: int) -> None:
            for rows, chunk in row_chunks(wt, block_size, (first, last)):
                blocks = chunk.reshape(chunk.shape[0], k_blocks, block_size)
                scales[rows] = _round_searched(blocks, 2, safe_units[rows, None])
                np.copyto(codes[rows], chunk, "unsafe")

        run_split(runs_of_rows, n, threads=threads)
    scales[units == 0] = 0.0  # a column of zeros: scale 0 dequantizes it exactly
    return BlockQuantized(
        code_array=codes,
        scales=scales,
        zero_points=np.full(scales.shape, _MIDDLE, dtype=np.uint8),
        k=k,
        block_size=block_size,
        bits=4,
        symmetric=True,
        units=units,
    )


def _round_searched(
    blocks: npt.NDArray[np.float32], axis: int, units: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """Replaces `blocks` (values along `axis`) by their codes, as floats; returns the scales.

    `units` broadcasts to the blocks' shape without `axis` (every unit positive).
    """
    high, low = blocks.max(axis=axis), blocks.min(axis=axis)
    peak = np.where(np.abs(high) > np.abs(low), high, low)
    nearest = peak / np.float32(-_MIDDLE)  # round-to-nearest's signed scale
    safe = np.where(nearest == 0, np.float32(1.0), nearest)
    ratios = blocks / np.expand_dims(safe, axis)  # in [-8, 8]
    best = np.ones(peak.shape, dtype=np.float32)
    best_error = np.full(peak.shape, np.inf, dtype=np.float32)
    trial = np.empty_like(ratios)
    for factor in SHRINK_GRID:
        f = np.float32(factor)
        np.multiply(ratios, np.float32(1.0) / f, out=trial)
        np.rint(trial, out=trial)
        np.clip(trial, -_MIDDLE, _MIDDLE - 1, out=trial)
        trial *= f
        trial -= ratios
        np.square(trial, out=trial)
        error = trial.sum(axis=axis)
        better = error < best_error
        best[better] = f
        best_error[better] = error[better]
    # the searched scale, snapped to a whole multiple of the column's unit
    multiple = np.clip(np.round(np.abs(nearest * best) / units), 1, MAX_MULTIPLIER)
    sign = np.where(nearest < 0, np.float32(-1.0), np.float32(1.0))
    scales = (sign * multiple * units).astype(np.float32)
    np.divide(blocks, np.expand_dims(scales, axis), out=blocks)
    np.rint(blocks, out=blocks)
    blocks += np.float32(_MIDDLE)
    np.clip(blocks, 0, 2 * _MIDDLE - 1, out=blocks)
    return scales
