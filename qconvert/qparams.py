"""Scale and zero-point math, in one place.

Affine quantization maps a real value r to an integer q in [qmin, qmax]:

    q = saturate(round_half_to_even(r / scale) + zero_point)
    r ≈ (q - zero_point) * scale

which is exactly what ONNX QuantizeLinear/DequantizeLinear compute. For a real range
[rmin, rmax], first widened to contain 0 so that zero is represented exactly (padding and
Relu depend on it):

    scale      = (rmax - rmin) / (qmax - qmin)
    zero_point = round(qmin - rmin / scale)            (asymmetric)
    zero_point = (qmin + qmax) / 2, rounded up          (symmetric: rmax = -rmin = max|r|)

Worked example, uint8 asymmetric, range [-1, 3]:
    scale = 4 / 255 = 0.015686..., zero_point = round(0 + 1 / 0.015686) = round(63.75) = 64.

Symmetric int8 uses [-127, 127] (not -128): the range is then symmetric around 0, so the
int8 x int8 products of the integer kernels never need the lone -128 case.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

# A scale below this would make r / scale overflow float32; such ranges are treated as zero.
_TINY = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True, slots=True, eq=False)
class QParams:
    """Quantization parameters of one tensor: per tensor (axis None) or per channel."""

    scale: npt.NDArray[np.float32]
    zero_point: np.ndarray
    axis: int | None = None

    @property
    def dtype(self) -> np.dtype:
        """The integer type the tensor is quantized to."""
        return self.zero_point.dtype

    def same_as(self, other: QParams) -> bool:
        """True when both describe the same mapping (same scale, zero point, axis, type)."""
        return (
            self.axis == other.axis
            and self.dtype == other.dtype
            and np.array_equal(self.scale, other.scale)
            and np.array_equal(self.zero_point, other.zero_point)
        )


def integer_range(
    dtype: npt.DTypeLike, *, symmetric: bool = False, reduce_range: bool = False
) -> tuple[int, int]:
    """The [qmin, qmax] a quantized tensor of `dtype` uses.

    `reduce_range` keeps one bit free (7-bit weights), for CPUs without VNNI where u8 x s8
    products summed in pairs can saturate int16.
    """
    dtype = np.dtype(dtype)
    info = np.iinfo(dtype)
    qmin, qmax = int(info.min), int(info.max)
    if reduce_range:
        if dtype == np.uint8:
            return 0, 127
        if dtype == np.int8:
            return -64, 64 if symmetric else 63
    if symmetric and qmin < 0:
        qmin = -qmax
    return qmin, qmax


def range_qparams(
    rmin: npt.ArrayLike,
    rmax: npt.ArrayLike,
    dtype: npt.DTypeLike,
    *,
    symmetric: bool,
    reduce_range: bool = False,
    axis: int | None = None,
) -> QParams:
    """Quantization parameters for the real range [rmin, rmax] (scalars or one per channel)."""
    dtype = np.dtype(dtype)
    qmin, qmax = integer_range(dtype, symmetric=symmetric, reduce_range=reduce_range)
    rmin = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    rmax = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    if symmetric:
        absmax = np.maximum(-rmin, rmax)
        rmin, rmax = -absmax, absmax
    # The zero point is derived from the float32 scale that is stored, not a wider one.
    scale = ((rmax - rmin) / (qmax - qmin)).astype(np.float32)
    degenerate = scale < _TINY
    scale = np.where(degenerate, np.float32(1.0), scale)
    if symmetric:
        zero_point = np.full_like(scale, (qmin + qmax + 1) // 2)
    else:
        zero_point = np.clip(np.round(qmin - rmin.astype(np.float32) / scale), qmin, qmax)
    zero_point = np.where(degenerate, 0 if qmin <= 0 <= qmax else qmin, zero_point)
    return QParams(
        scale=np.asarray(scale, dtype=np.float32),
        zero_point=np.asarray(zero_point).astype(dtype),
        axis=axis,
    )


def weight_qparams(
    weights: npt.NDArray[np.floating],
    dtype: npt.DTypeLike,
    *,
    axis: int | None,
    symmetric: bool = True,
    reduce_range: bool = False,
) -> QParams:
    """Parameters for a constant tensor, per tensor (axis None) or per slice along `axis`."""
    if axis is None:
        rmin, rmax = weights.min(initial=0.0), weights.max(initial=0.0)
    else:
        other_axes = tuple(i for i in range(weights.ndim) if i != axis % weights.ndim)
        rmin = weights.min(axis=other_axes, initial=0.0)
        rmax = weights.max(axis=other_axes, initial=0.0)
    return range_qparams(
        rmin, rmax, dtype, symmetric=symmetric, reduce_range=reduce_range, axis=axis
    )


def quantize(values: npt.ArrayLike, qparams: QParams) -> np.ndarray:
    """QuantizeLinear in numpy: round half to even, then saturate.

    The division is done in float32, as QuantizeLinear defines it, in place: weights can
    be hundreds of megabytes.
    """
    scaled = np.array(values, dtype=np.float32)
    scale, zero_point = _broadcastable(qparams, scaled.ndim)
    info = np.iinfo(qparams.dtype)
    np.divide(scaled, scale, out=scaled)
    np.rint(scaled, out=scaled)
    # Zero points of 8- and 16-bit types are exact in float32.
    scaled += zero_point.astype(np.float32)
    np.clip(scaled, info.min, info.max, out=scaled)
    return scaled.astype(qparams.dtype)


def dequantize(quantized: np.ndarray, qparams: QParams) -> npt.NDArray[np.float32]:
    """DequantizeLinear in numpy."""
    scale, zero_point = _broadcastable(qparams, quantized.ndim)
    if quantized.dtype.itemsize <= 2 and scale.dtype == np.float32:
        # The same bits in float32, a quarter of the memory traffic (bias correction
        # dequantizes every weight of the model for each recipe trial): an 8- or 16-bit
        # value less its zero point is exact in float32, and so is its float64 product
        # with a float32 scale, which both ways then round once to float32.
        shifted = quantized.astype(np.float32)
        shifted -= zero_point.astype(np.float32)
        shifted *= scale
        return shifted
    shifted = quantized.astype(np.int64) - zero_point.astype(np.int64)
    return (shifted * scale).astype(np.float32)


def bias_qparams(input_scale: np.ndarray, weight_scale: np.ndarray) -> QParams:
    """int32 bias parameters: scale = input scale x weight scale, zero point 0.

    The integer kernels accumulate x_q * w_q in int32 at exactly that scale, so the bias
    is added without rescaling.
    """
    scale = (np.float32(input_scale) * weight_scale.astype(np.float32)).astype(np.float32)
    scale = np.where(scale < _TINY, np.float32(1.0), scale).astype(np.float32)
    axis = 0 if scale.ndim == 1 else None
    return QParams(scale=scale, zero_point=np.zeros_like(scale, dtype=np.int32), axis=axis)


# Biases are kept within half the int32 range: the integer kernels add the x_q * w_q
# products to the bias in the same int32 accumulator, and those need headroom too.
BIAS_LIMIT = 2**30


def fit_weight_scale_to_bias(
    weight: QParams, weights: np.ndarray, input_scale: np.ndarray, bias: np.ndarray
) -> QParams:
    """Weight parameters chosen so that `bias` is stored in int32 without loss.

    The bias is stored as round(b / (input scale x weight scale)). Two cases break it:

    1. A tiny input scale (an input of magnitude 1e-6, say) makes the quotient overflow
       int32, and clipping it would silently lose the bias. The weight scale of those
       channels is raised to |b| / (input scale x BIAS_LIMIT), trading a little weight
       resolution for a correct bias.
    2. An all-zero weight channel has no natural scale (1.0 by convention), and with it the
       bias scale can be coarser than the bias itself, which then rounds to 0. Any scale
       represents zero weights exactly, so such channels take the finest scale the bias
       allows, |b| / (input scale x BIAS_LIMIT).
    3. A weight scale so small that input scale x weight scale falls below the smallest
       normal float32 (a dead channel of denormal weights and a denormal bias, as weight
       decay leaves them) has no bias scale: `bias_qparams` would store 1.0 there, and
       onnxruntime fuses a Conv or Gemm into its integer kernel only when the bias scale is
       input scale x weight scale, so the layer ran in float between its Q/DQ (4 Convs of
       a CTC text recognizer). Such channels are raised to the smallest weight scale whose
       product is normal: every weight that small still rounds to 0.

    Returns `weight` itself when nothing needs to change.
    """
    needed = np.abs(bias.astype(np.float64)) / (float(input_scale) * BIAS_LIMIT)
    # "All zero" as stored: denormal weights quantize to zero as well.
    stored_zero = _stored_as_zero_point(weights, weight)
    if weight.axis is None:
        zero_weights = bool(np.all(stored_zero))
        needed = np.max(needed, initial=0.0)
    else:
        other_axes = tuple(i for i in range(weights.ndim) if i != weight.axis % weights.ndim)
        zero_weights = np.all(stored_zero, axis=other_axes)
    current = weight.scale.astype(np.float64)
    scale = np.where(zero_weights & (needed > 0), needed, np.maximum(current, needed))
    scale = np.maximum(scale, _product_floor(input_scale))
    if np.array_equal(scale, current):
        return weight
    return QParams(
        scale=scale.astype(np.float32), zero_point=weight.zero_point, axis=weight.axis
    )


def _stored_as_zero_point(weights: np.ndarray, params: QParams) -> np.ndarray:
    """Whether `weights` are stored as their zero point: per value, or per channel.

    QuantizeLinear never decreases as its input grows (a division by a positive scale,
    rounding, saturation), so every value of a channel lands on the zero point exactly
    when its least and greatest values do: only those two are quantized per channel, not
    the whole weight, which the recipe's plans of every trial did once per biased layer.
    The result broadcasts against `weights`. Where a channel's extremes are not numbers
    (NaN weights), every value is quantized, as before.
    """
    zero_point = params.zero_point.reshape(_broadcast_shape(params, weights.ndim))
    if weights.size and (params.axis is None or params.scale.ndim == 1):
        if params.axis is None:
            low, high = weights.min(keepdims=True), weights.max(keepdims=True)
        else:
            axis = params.axis % weights.ndim
            other_axes = tuple(i for i in range(weights.ndim) if i != axis)
            low = weights.min(axis=other_axes, keepdims=True)
            high = weights.max(axis=other_axes, keepdims=True)
        if not (np.isnan(low).any() or np.isnan(high).any()):
            return (quantize(low, params) == zero_point) & (
                quantize(high, params) == zero_point
            )
    return quantize(weights, params) == zero_point


def _product_floor(input_scale: np.ndarray) -> np.float32:
    """The smallest float32 weight scale whose product with `input_scale` is normal.

    Normal in float32, and the floor is itself no smaller than the smallest normal float.
    """
    factor = np.float32(np.asarray(input_scale).reshape(()))
    floor = np.float32(max(_TINY, _TINY / float(factor)))
    while factor * floor < _TINY:
        floor = np.nextafter(floor, np.float32(np.inf))
    return floor


def _broadcast_shape(qparams: QParams, ndim: int) -> tuple[int, ...]:
    """The shape that lines per-axis parameters up with a tensor of rank `ndim`."""
    if qparams.axis is None or qparams.scale.ndim != 1:
        return qparams.scale.shape
    shape = [1] * ndim
    shape[qparams.axis % ndim] = qparams.scale.size
    return tuple(shape)


def _broadcastable(qparams: QParams, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    shape = _broadcast_shape(qparams, ndim)
    return qparams.scale.reshape(shape), qparams.zero_point.reshape(shape)
