"""AWQ-class activation-aware scaling of a layer's input channels, chosen on held-out samples.

For y = x @ W, W (K, N), and any positive s (K,), y = (x / s) @ (diag(s) W). Input channels
whose activations are large weigh most in the output error; scaling their weight rows up
before rounding gives them finer steps within their blocks, at the expense of the others
(Lin et al., 2023, AWQ). As in AWQ, s = rms(x)^alpha, normalised so that
sqrt(max(s) * min(s)) = 1, with alpha searched on a grid. The search rounds diag(s) W to
nearest and measures the layer's output error on the held-out samples, tr(E^T H_held E)
with E = W - diag(1/s) Q(diag(s) W); a scale is kept only where it lowers that error against
the unscaled weight rounded the same way. The rewrite then multiplies the layer's input by
1/s (a Mul before it) and the weight is rounded in the scaled space, where the error of
every candidate rounding (`int4_rounding`) is the same as in the original one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from qconvert.blockwise import column_units, quantize_rtn
from qconvert.gptq import layer_error

ALPHA_GRID = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
"""Exponents tried; 0 (no scaling) is the baseline the best of them must beat."""


@dataclass(frozen=True, slots=True)
class ScaleChoice:
    """The search's outcome for one layer.

    Attributes:
        scales: s (K,) float32, or None where no exponent lowered the held-out error.
        alpha: the exponent kept (0.0 when none).
        base_error: held-out output error of the unscaled weight rounded to nearest.
        error: held-out output error with s (equal to base_error when none).
    """

    scales: npt.NDArray[np.float32] | None
    alpha: float
    base_error: float
    error: float


def channel_scales(mean_square: npt.NDArray, alpha: float) -> npt.NDArray[np.float32]:
    """s = rms^alpha per input channel, normalised to a geometric middle of 1.

    Channels never active (mean square 0) get the smallest scale of the others.
    """
    rms = np.sqrt(np.maximum(np.asarray(mean_square, np.float64), 0.0))
    live = rms > 0
    if not live.any():
        return np.ones(rms.shape, np.float32)
    rms = np.where(live, rms, rms[live].min())
    s = rms**alpha
    s = s / np.sqrt(s.max() * s.min())
    return s.astype(np.float32)


def choose_scale(
    w: npt.NDArray[np.float32],
    fit: npt.NDArray[np.float64],
    held: npt.NDArray[np.float64],
    *,
    block_size: int,
    symmetric: bool,
    int8_grid: bool = False,
) -> ScaleChoice:
    """The input scale of least held-out output error for weight `w` (K, N), or none.

    `fit` and `held` are the summed X^T X of the layer input on the fitting and the
    held-out samples; the scales come from the fitting ones' diagonal.
    """
    w = np.asarray(w, np.float32)

    def error(scales: npt.NDArray[np.float32] | None) -> float:
        scaled = w if scales is None else w * scales[:, None]
        wt = np.ascontiguousarray(scaled.T)
        quantized = quantize_rtn(
            wt,
            block_size=block_size,
            symmetric=symmetric,
            units=column_units(wt) if int8_grid else None,
        )
        back = quantized.dequantize().T
        if scales is not None:
            back = back / scales[:, None]
        return layer_error(w, back, held)

    base = error(None)
    best = ScaleChoice(None, 0.0, base, base)
    mean_square = np.diag(fit)
    for alpha in ALPHA_GRID:
        scales = channel_scales(mean_square, alpha)
        measured = error(scales)
        if measured < best.error:
            best = ScaleChoice(scales, alpha, base, measured)
    return best
