"""What a quantization scheme is: number types, symmetry and granularity.

A scheme is plain frozen data; the planner reads it to choose parameters, the passes never
do. `SCHEMES` names the presets the command line offers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from qconvert.errors import ConfigError


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
            DequantizeLinear needs 13).
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

    def with_options(self, **changes: object) -> StaticScheme:
        """A copy with some fields changed, validated again."""
        return replace(self, **changes)


INT8 = StaticScheme(name="int8")

SCHEMES: dict[str, StaticScheme] = {scheme.name: scheme for scheme in (INT8,)}
