"""What a `quantize` run is asked to do, as one frozen, validated value.

`QuantizeConfig` gathers the scheme, the format and the controls (exclusions, overrides,
target opset). Its `__post_init__` rejects bad values and options that do not go together
with a `ConfigError` (exit 2) that says what does go together; a config that exists is
valid on its own. What can only be checked against a model (an override naming a node the
model lacks) is checked by the planner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import onnx.defs

from qconvert.errors import ConfigError
from qconvert.int4_options import check_int4_options
from qconvert.overrides import Overrides
from qconvert.schemes import (
    ACTIVATION_TYPES,
    BLOCKED_DQ_MIN_OPSET,
    INT16_MIN_OPSET,
    SCHEMES,
    BlockedWeightScheme,
    DynamicScheme,
    Scheme,
    StaticScheme,
)


class Format(str, Enum):
    """How a static int8 model is written."""

    QDQ = "qdq"
    """QuantizeLinear/DequantizeLinear around float ops; runtimes fuse the groups."""
    QOP = "qop"
    """Integer operators (QLinearConv, QLinearMatMul, QGemm, ...) in the graph itself."""


@dataclass(frozen=True, slots=True, kw_only=True)
class QuantizeConfig:
    """The options of one `quantize` run.

    Attributes:
        scheme: a name from `qconvert.schemes.SCHEMES`.
        format: `qdq` (any static scheme, int4) or `qop` (int8, int4); None: qop for
            int4 (MatMulNBits), else qdq.
        activation_type: `uint8` or `int8` activations for the int8 scheme; None keeps the
            scheme's own (uint8 for int8, int16 for 16x8).
        symmetric_activations: zero point in the middle of the activation range (static
            schemes; 16x8 is symmetric already).
        per_channel: one weight scale per output channel (else one per tensor).
        reduce_range: 7-bit weights, for CPUs without VNNI (int8 and int8-dynamic).
        exclude: node names or op types (glob patterns) to leave float.
        include_only: when given, only nodes matching one of these patterns are converted.
        overrides: per-node and per-tensor precision, read from an override file.
        opset: the ai.onnx opset to write (upgrading the model); None: the lowest the
            scheme allows, and never below the model's own.
        keep_io_types: fp16 only: graph inputs and outputs stay float32.
        equalize: cross-layer equalization of Conv -> [Relu] -> Conv pairs before
            calibration (`passes.equalize`).
        bias_correction: shift each quantized Conv/Gemm bias by the mean error its
            quantized weights make on the calibration data (`passes.bias_correct`).
        adaround: choose each MatMul/Gemm weight's rounding to minimise the layer's
            output error on the calibration data (`passes.adaround`).
        smooth_quant: SmoothQuant's alpha in [0, 1]: migrate activation outliers after
            LayerNormalization into the MatMul weights that read them (`passes.smooth`);
            None: off.
        input_shapes: (input name, dims) pairs fixing a model's dynamic input dims before
            planning (`--input-shape name:1x3x224x224`); the written model keeps them.
        block_size: int4: weights per block along the reduction axis (32, 64 or 128);
            None: 32.
        asymmetric_weights: int4: a zero point per block (else symmetric).
        quantize_embeddings: int4: also the tables read by Gather (embeddings).
        accuracy_level: int4 qop: MatMulNBits' accuracy_level (0 unset, 1 fp32, 2 fp16,
            3 bf16, 4 int8 compute); None: the default of `qconvert.int4_options`.
        scale_search: int4: shrink each block's range to its least squared error (an MSE
            search of the scale) before rounding.
        int4_kernel: int4 qop: "nbits" (MatMulNBits) or "int8" (4-bit codes expanded to
            int8 when onnxruntime loads the model, run by DynamicQuantizeMatMul); None: not
            given, until the int4 pipeline stores `int4_options.default_int4_kernel`'s
            choice here (it needs to know whether the weights are in external data).
        size_budget: int4 with data: percent of the float model's file size the output may
            reach by keeping the layers whose 4 bits cost most at 8 bits (`int4_mix`); 0
            keeps every layer at 4 bits; None: `int4_mix.DEFAULT_SIZE_BUDGET`.
    """

    scheme: str = "int8"
    format: Format | None = None
    activation_type: str | None = None
    symmetric_activations: bool = False
    per_channel: bool = True
    reduce_range: bool = False
    exclude: tuple[str, ...] = ()
    include_only: tuple[str, ...] = ()
    overrides: Overrides = field(default_factory=Overrides)
    opset: int | None = None
    keep_io_types: bool = True
    equalize: bool = False
    bias_correction: bool = False
    adaround: bool = False
    smooth_quant: float | None = None
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    block_size: int | None = None
    asymmetric_weights: bool = False
    quantize_embeddings: bool = False
    accuracy_level: int | None = None
    scale_search: bool = False
    int4_kernel: str | None = None
    size_budget: float | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(
                f"Unknown scheme '{self.scheme}'.", hint=f"choose from {', '.join(SCHEMES)}."
            )
        if self.format is None:
            object.__setattr__(self, "format", "qop" if self.scheme == "int4" else "qdq")
        try:
            object.__setattr__(self, "format", Format(self.format))
        except ValueError:
            raise ConfigError(
                f"Unknown format '{self.format}'.", hint="choose from qdq, qop."
            ) from None
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "include_only", tuple(self.include_only))
        shapes = tuple((name, tuple(int(d) for d in dims)) for name, dims in self.input_shapes)
        object.__setattr__(self, "input_shapes", shapes)
        names = [name for name, _ in shapes]
        for name, dims in shapes:
            if not dims or any(d < 1 for d in dims):
                raise ConfigError(
                    f"--input-shape for '{name}' needs positive sizes, not {dims}.",
                    hint="write it as input:1x3x224x224.",
                )
            if names.count(name) > 1:
                raise ConfigError(f"--input-shape is given twice for input '{name}'.")
        preset = SCHEMES[self.scheme]
        if self.format is Format.QOP and self.scheme not in ("int8", "int4"):
            raise ConfigError(
                f"--format qop does not go with --scheme {self.scheme}: integer operators "
                "exist for 8-bit static quantization and 4-bit weights only.",
                hint=f"use --format qop with --scheme int8 or int4, or --format qdq with "
                f"--scheme {self.scheme}.",
            )
        check_int4_options(self)
        if self.activation_type is not None:
            if self.activation_type not in ACTIVATION_TYPES:
                raise ConfigError(
                    f"Unknown activation type '{self.activation_type}'.",
                    hint=f"choose from {', '.join(ACTIVATION_TYPES)}.",
                )
            if self.scheme != "int8":
                raise ConfigError(
                    f"--activation-type does not go with --scheme {self.scheme}.",
                    hint="it chooses uint8 or int8 activations for --scheme int8; 16x8 "
                    "activations are int16, int8-dynamic's are uint8 by definition.",
                )
        if self.symmetric_activations and not isinstance(preset, StaticScheme):
            raise ConfigError(
                f"--symmetric-activations does not go with --scheme {self.scheme}.",
                hint="it applies to the static schemes int8 and 16x8.",
            )
        if self.reduce_range and self.scheme not in ("int8", "int8-dynamic"):
            raise ConfigError(
                f"--reduce-range does not go with --scheme {self.scheme}.",
                hint="it applies to int8 and int8-dynamic, whose u8 x s8 products can "
                "saturate on CPUs without VNNI.",
            )
        if not self.keep_io_types and self.scheme != "fp16":
            raise ConfigError(
                f"--no-keep-io-types does not go with --scheme {self.scheme}.",
                hint="only fp16 can give the model float16 inputs and outputs.",
            )
        if self.equalize and self.scheme in ("fp16", "fp16-weights", "int4"):
            raise ConfigError(
                f"--equalize does not go with --scheme {self.scheme}.",
                hint="it evens out channel ranges for integer weights: int8, 16x8, "
                "int8-dynamic.",
            )
        if self.bias_correction and not isinstance(preset, StaticScheme):
            raise ConfigError(
                f"--bias-correction does not go with --scheme {self.scheme}.",
                hint="it needs calibration data: int8 or 16x8.",
            )
        if self.adaround and not isinstance(preset, StaticScheme):
            raise ConfigError(
                f"--adaround does not go with --scheme {self.scheme}.",
                hint="it rounds weights against calibration data: int8 or 16x8.",
            )
        if self.smooth_quant is not None:
            if not 0.0 <= self.smooth_quant <= 1.0:
                raise ConfigError(
                    f"--smooth-quant {self.smooth_quant} is out of range; alpha must be in "
                    "[0, 1].",
                    hint="0.5 is the usual choice.",
                )
            if not isinstance(preset, StaticScheme):
                raise ConfigError(
                    f"--smooth-quant does not go with --scheme {self.scheme}.",
                    hint="it balances static activation ranges: int8 or 16x8.",
                )
        if self.opset is not None:
            newest = onnx.defs.onnx_opset_version()
            if not 7 <= self.opset <= newest:
                raise ConfigError(
                    f"--opset {self.opset} is out of range.",
                    hint=f"choose an ai.onnx opset from 7 to {newest}.",
                )
            needed = self.min_opset
            if self.opset < needed:
                raise ConfigError(
                    f"--opset {self.opset} is too low for --scheme {self.scheme}, which "
                    f"needs opset {needed} or later.",
                    hint=f"pass --opset {needed} or leave it out.",
                )

    def resolve_scheme(self) -> Scheme:
        """The preset of `scheme` with this config's options applied."""
        preset = SCHEMES[self.scheme]
        if isinstance(preset, StaticScheme):
            changes: dict[str, object] = {
                "per_channel": self.per_channel,
                "reduce_range": self.reduce_range,
            }
            if self.activation_type is not None:
                changes["activation_dtype"] = ACTIVATION_TYPES[self.activation_type]
            if self.symmetric_activations:
                changes["activation_symmetric"] = True
            return preset.with_options(**changes)
        if isinstance(preset, DynamicScheme):
            return preset.with_options(
                per_channel=self.per_channel, reduce_range=self.reduce_range
            )
        if isinstance(preset, BlockedWeightScheme):
            return preset.with_options(
                block_size=self.block_size or preset.block_size,
                symmetric=not self.asymmetric_weights,
            )
        return preset.with_options(keep_io_types=self.keep_io_types)

    @property
    def needs_calibration(self) -> bool:
        """Whether the scheme needs activation ranges from data."""
        return SCHEMES[self.scheme].needs_calibration

    @property
    def min_opset(self) -> int:
        """The lowest ai.onnx opset the written model may have, overrides included."""
        needed = SCHEMES[self.scheme].min_opset
        if self.scheme == "int4" and (self.format is Format.QDQ or self.int4_kernel == "int8"):
            needed = BLOCKED_DQ_MIN_OPSET  # INT4 initializers (DequantizeLinear, Cast)
        if self.overrides.uses_int16():
            needed = max(needed, INT16_MIN_OPSET)
        return needed

    @property
    def target_opset(self) -> int:
        """The opset to upgrade the model to (it is never lowered)."""
        return self.opset if self.opset is not None else self.min_opset


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """`name:1x3x224x224` -> ("name", (1, 3, 224, 224)).

    Raises:
        ConfigError: when the text is not NAME:DIMS with positive sizes.
    """
    name, separator, dims = text.rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.split("x"))
    except ValueError:
        shape = ()
    if not separator or not name or not shape or any(d < 1 for d in shape):
        raise ConfigError(
            f"--input-shape '{text}' is not NAME:DIMS.",
            hint="write it as input:1x3x224x224 (positive sizes separated by x).",
        )
    return name, shape
