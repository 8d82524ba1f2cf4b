"""GPTQ-class rounding: quantize a weight's rows one by one, feeding each error forward.

For a layer y = x @ W, W (K, N), and the Gram matrix H = sum over samples of X^T X of its
input (K, K), the output error of a quantized W' is tr((W - W')^T H (W - W')). GPTQ
(Frantar et al., 2022) quantizes the K input rows in order; after rounding row k it spreads
that row's error over the rows not yet quantized, weighted by the inverse Hessian, so they
can absorb it:

    e = (w_k - q_k) / [H^-1]_kk
    W[k+1:] -= [H^-1]_{k, k+1:}^T e          (through the Cholesky factor of H^-1)

Block scales are fixed when a block's first row is reached, from the rows as updated so
far; so the result is a plain `BlockQuantized` any of the runtime's blocked formats reads.
H needs only the running sum of X^T X over the samples: memory does not grow with them.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from qconvert.blockwise import (
    BlockQuantized,
    best_shrink,
    block_params,
    codes_for,
    dequantize_blocks,
    snap_scales,
)

DAMPING = 0.01
"""Added to H's diagonal, as a share of its mean: keeps H^-1 well defined."""

LAZY_BATCH = 128
"""Rows updated together before the error reaches the rest (a multiple of block sizes)."""


def gram(x: npt.NDArray[np.floating], k: int) -> npt.NDArray[np.float64]:
    """X^T X of an input (..., K) flattened to rows.

    One sample's product is formed in float32 (single-precision BLAS is twice as fast, and
    a sample's rows are few); the sums across samples are float64.
    """
    rows = np.asarray(x, dtype=np.float32).reshape(-1, k)
    return (rows.T @ rows).astype(np.float64)


def layer_error(
    w: npt.NDArray[np.float32], w_quantized: npt.NDArray[np.float32], h: npt.NDArray
) -> float:
    """tr((W - W')^T H (W - W')): the summed squared output error on the samples of H."""
    delta = np.asarray(w, np.float64) - np.asarray(w_quantized, np.float64)
    return float(np.einsum("kn,kn->", h @ delta, delta))


def quantize_gptq(
    w: npt.NDArray[np.float32],
    h: npt.NDArray[np.float64],
    *,
    block_size: int,
    bits: int = 4,
    symmetric: bool = True,
    search: bool = False,
    units: npt.NDArray[np.float32] | None = None,
) -> BlockQuantized:
    """GPTQ rounding of a MatMul weight `w` (K, N) with input Gram matrix `h` (K, K).

    With `search`, each block's range is shrunk by the factor of least squared error (on
    the rows as updated when the block starts). With `units` (N,), each block's scale is
    snapped to the int8 grid (`blockwise`) when it is fixed.
    """
    k, n = w.shape
    k_blocks = -(-k // block_size)
    weights = np.zeros((n, k_blocks * block_size), dtype=np.float64)
    weights[:, :k] = np.asarray(w, dtype=np.float64).T
    hessian = np.zeros((k_blocks * block_size,) * 2, dtype=np.float64)
    hessian[:k, :k] = h
    # inputs never seen (and the padding) carry no error: their rows quantize as they are
    dead = np.diag(hessian) <= 0
    hessian[dead, dead] = 1.0
    hessian[np.diag_indices_from(hessian)] += DAMPING * float(np.mean(np.diag(hessian)))
    upper = _inverse_cholesky_upper(hessian)
    codes = np.zeros(weights.shape, dtype=np.uint8)
    scales = np.zeros((n, k_blocks), dtype=np.float32)
    zero_points = np.zeros((n, k_blocks), dtype=np.uint8)
    batch = max(LAZY_BATCH // block_size, 1) * block_size
    total = weights.shape[1]
    for start in range(0, total, batch):
        end = min(start + batch, total)
        chunk = weights[:, start:end].copy()
        errors = np.zeros_like(chunk)
        inverse = upper[start:end, start:end]
        for i in range(end - start):
            column = start + i
            block = column // block_size
            if column % block_size == 0:
                values = chunk[:, i : i + block_size].astype(np.float32)[:, None, :]
                shrink = best_shrink(values, bits=bits, symmetric=symmetric) if search else 1.0
                s, z = block_params(values, bits=bits, symmetric=symmetric, shrink=shrink)
                if units is not None:
                    s = snap_scales(s, units)
                scales[:, block], zero_points[:, block] = s[:, 0], z[:, 0]
            s, z = scales[:, block], zero_points[:, block]
            c = codes_for(chunk[:, i, None].astype(np.float32), s, z, bits=bits)[:, 0]
            codes[:, column] = c
            rounded = dequantize_blocks(c[:, None], s, z)[:, 0].astype(np.float64)
            error = (chunk[:, i] - rounded) / inverse[i, i]
            chunk[:, i:] -= np.outer(error, inverse[i, i:])
            errors[:, i] = error
        weights[:, end:] -= errors @ upper[start:end, end:]
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


def _inverse_cholesky_upper(h: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """U upper triangular with U^T U = H^-1, growing the damping until H is definite."""
    damping = 0.0
    eye = np.eye(h.shape[0])
    scale = float(np.mean(np.diag(h)))
    for _ in range(8):
        try:
            inverse = np.linalg.inv(h + damping * eye)
            return np.linalg.cholesky(inverse).T
        except np.linalg.LinAlgError:
            damping = scale * (0.1 if damping == 0 else damping * 10 / scale)
    return np.diag(1.0 / np.sqrt(np.diag(h)))
