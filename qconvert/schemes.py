"""What a quantization scheme is: number types, symmetry and granularity.

A scheme is plain frozen data; the planner reads it to choose parameters, the passes never
do. `SCHEMES` names the presets the command line offers:

- `int8`: static; uint8 (or int8) activations calibrated on data, int8 symmetric weights,
  int32 bias. onnxruntime runs the QDQ groups as integer kernels.
- `16x8`: static; int16 symmetric activations, int8 weights (TensorFlow Lite's 16x8 mode).
  int16 QuantizeLinear/DequantizeLinear need ai.onnx opset 21. onnxruntime has no int16
  kernels on CPU, so it dequantizes around every op: the model is smaller and closer to
  float than int8, but runs slower than float there.
- `int8-dynamic`: weights quantized ahead of time, activations at run time; no data.
- `fp16`: float16 weights and compute; `fp16-weights`: float16 storage, float32 compute.
- `int4`: weight-only; MatMul/Gemm (and, on request, embedding) weights in 4-bit blocks
  along the reduction axis, activations stay float; no data needed (`--data` improves the
  rounding).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from qconvert.errors import ConfigError

INT16_MIN_OPSET = 21
"""The first ai.onnx opset whose QuantizeLinear/DequantizeLinear accept int16."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StaticScheme:
    """Static quantization: activation ranges from calibration, weights from their values.

    Attributes:
        name: the preset's name, as the command line spells it.
        activation_dtype: integer type of activations (uint8 by default: onnxruntime's
            fastest CPU kernels take u8 activations with s8 weights).
        activation_symmetric: symmetric activation ranges (zero point in the middle).
        weight_dtype: integer type of weights.
        per_channel: one scale per output channel of each weight (else one per tensor).
        reduce_range: 7-bit weights, for CPUs without VNNI.
        min_opset: the lowest ai.onnx opset the written model may have (per-axis
            DequantizeLinear needs 13, int16 QuantizeLinear 21).
    """

    name: str
    activation_dtype: np.dtype = np.dtype(np.uint8)
    activation_symmetric: bool = False
    weight_dtype: np.dtype = np.dtype(np.int8)
    per_channel: bool = True
    reduce_range: bool = False
    min_opset: int = 13

    def __post_init__(self) -> None:
        for field, dtype in (
            ("activation", self.activation_dtype),
            ("weight", self.weight_dtype),
        ):
            if np.dtype(dtype).kind not in "iu":
                raise ConfigError(
                    f"The {field} type of scheme '{self.name}' must be an integer."
                )

    @property
    def needs_calibration(self) -> bool:
        """Static schemes need activation ranges, so calibration data."""
        return True

    def with_options(self, **changes: object) -> StaticScheme:
        """A copy with some fields changed, validated again."""
        return replace(self, **changes)


@dataclass(frozen=True, slots=True, kw_only=True)
class DynamicScheme:
    """Dynamic quantization: int8 weights stored, activations quantized at run time.

    Activations go through DynamicQuantizeLinear, which always yields uint8 asymmetric
    values with a per-tensor scale computed from the tensor itself.

    Attributes:
        name: the preset's name.
        weight_dtype: integer type of weights (int8, symmetric).
        per_channel: one weight scale per output column (else one per tensor).
        reduce_range: 7-bit weights, for CPUs without VNNI.
        min_opset: DynamicQuantizeLinear exists from ai.onnx 11 on.
    """

    name: str
    weight_dtype: np.dtype = np.dtype(np.int8)
    per_channel: bool = True
    reduce_range: bool = False
    min_opset: int = 11

    @property
    def needs_calibration(self) -> bool:
        """Activation ranges are found at run time: no data needed."""
        return False

    def with_options(self, **changes: object) -> DynamicScheme:
        """A copy with some fields changed."""
        return replace(self, **changes)


@dataclass(frozen=True, slots=True, kw_only=True)
class Float16Scheme:
    """Float16 conversion: no calibration, no integers.

    Attributes:
        name: the preset's name.
        storage_only: float16 initializers upcast to float32 once, at load (constant
            folding of Cast); the arithmetic stays float32.
        keep_io_types: graph inputs and outputs stay float32, with Casts at the edges.
        min_opset: the lowest opset written (no constraint: Cast exists everywhere).
    """

    name: str
    storage_only: bool = False
    keep_io_types: bool = True
    min_opset: int = 1

    @property
    def needs_calibration(self) -> bool:
        """float16 conversion reads no data."""
        return False

    def with_options(self, **changes: object) -> Float16Scheme:
        """A copy with some fields changed."""
        return replace(self, **changes)


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockedWeightScheme:
    """Weight-only blocked quantization: one scale per block along the reduction axis.

    Attributes:
        name: the preset's name.
        bits: bits per weight (4; 8 for the layers an override keeps at 8 bits).
        block_size: values per block along the reduction axis K.
        symmetric: zero point fixed at the middle code (else one zero point per block).
        min_opset: the lowest ai.onnx opset written (blocked DequantizeLinear needs 21;
            MatMulNBits needs none, so the QOperator form keeps the model's opset).
    """

    name: str
    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    min_opset: int = 1

    @property
    def needs_calibration(self) -> bool:
        """Weights are quantized from their values; data only improves the rounding."""
        return False

    def with_options(self, **changes: object) -> BlockedWeightScheme:
        """A copy with some fields changed."""
        return replace(self, **changes)


Scheme = StaticScheme | DynamicScheme | Float16Scheme | BlockedWeightScheme

INT8 = StaticScheme(name="int8")
# TensorFlow Lite's 16x8: int16 activations with zero point 0, int8 per-channel weights.
INT16X8 = StaticScheme(
    name="16x8",
    activation_dtype=np.dtype(np.int16),
    activation_symmetric=True,
    min_opset=INT16_MIN_OPSET,
)
INT8_DYNAMIC = DynamicScheme(name="int8-dynamic")
FP16 = Float16Scheme(name="fp16")
FP16_WEIGHTS = Float16Scheme(name="fp16-weights", storage_only=True)
INT4 = BlockedWeightScheme(name="int4")
BLOCKED_DQ_MIN_OPSET = 21
"""The first ai.onnx opset whose DequantizeLinear reads int4 and takes a block_size."""

SCHEMES: dict[str, Scheme] = {
    scheme.name: scheme for scheme in (INT8, INT16X8, INT8_DYNAMIC, FP16, FP16_WEIGHTS, INT4)
}

ACTIVATION_TYPES: dict[str, np.dtype] = {
    "uint8": np.dtype(np.uint8),
    "int8": np.dtype(np.int8),
}
"""The activation types `--activation-type` offers for the int8 scheme."""
