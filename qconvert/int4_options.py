"""The options only `--scheme int4` takes, and the checks that they go together."""

from __future__ import annotations

from typing import Any

from qconvert.errors import ConfigError
from qconvert.schemes import BLOCKED_DQ_MIN_OPSET

BLOCK_SIZE_CHOICES = (32, 64, 128)
"""Block sizes the command line offers (onnxruntime's kernels take powers of two >= 16)."""

DEFAULT_BLOCK_SIZE = 32

DEFAULT_ACCURACY_LEVEL = 4
"""MatMulNBits computes with int8-quantized activations (per block) at level 4: onnxruntime's
fastest CPU path. Level 0/1 dequantizes the weights and multiplies in float32, the same
numbers as the blocked QDQ form."""


INT4_KERNELS = ("nbits", "int8")
"""How a qop int4 MatMul runs: com.microsoft MatMulNBits, or its 4-bit codes expanded to int8
when onnxruntime loads the model (constant folding) and run by DynamicQuantizeMatMul, with
activations quantized per tensor on the fly (`passes.int4`)."""

DEFAULT_INT4_KERNEL = "int8"
"""The int8 kernel, with or without data. On a 6-layer sentence encoder (block 32) it runs at
0.48x float on one thread against MatMulNBits' 0.93x. Without data its weights are rounded with
a searched range (`grid_rounding`), which makes up for its per-tensor activation rounding:
cosine 0.9604 against onnxruntime RTN's 0.9602 (round-to-nearest on its grid: 0.9541). With
data the rounding and the size budget are chosen on held-out samples: cosine 0.983 (MatMulNBits
0.984, onnxruntime's best int4 0.976)."""

FALLBACK_INT4_KERNEL = "nbits"
"""MatMulNBits, where an option only it reads is given or the int8 kernel cannot be written
(`default_int4_kernel`)."""


def default_int4_kernel(config: Any, *, external: bool) -> str:
    """The kernel an int4 qop run writes when `--int4-kernel` is not given.

    The one place that decides it: the int4 pipeline stores it in the config before
    anything reads it.

    The int8 kernel, unless an option only MatMulNBits reads is given (zero points,
    `--accuracy-level`), `--opset` is below the int8 kernel's INT4 initializers' 21, or the
    model keeps its weights in external data: an opset upgrade would read every weight into
    memory, the size budget is not applied there, and MatMulNBits' packed bytes are
    written without the int8 kernel's extra Cast/Mul chain (the 3 GB decoder's wall time).
    MatMulNBits otherwise.
    """
    int8_fits = (
        not external
        and not config.asymmetric_weights
        and config.accuracy_level is None
        and (config.opset is None or config.opset >= BLOCKED_DQ_MIN_OPSET)
    )
    return DEFAULT_INT4_KERNEL if int8_fits else FALLBACK_INT4_KERNEL


def check_int4_options(config: Any) -> None:
    """Refuses int4 options on other schemes and values int4 cannot take.

    Raises:
        ConfigError: naming the option and what it goes with.
    """
    int4 = config.scheme == "int4"
    for flag, given in (
        ("--block-size", config.block_size is not None),
        ("--asymmetric-weights", config.asymmetric_weights),
        ("--quantize-embeddings", config.quantize_embeddings),
        ("--accuracy-level", config.accuracy_level is not None),
        ("--scale-search", config.scale_search),
        ("--int4-kernel", config.int4_kernel is not None),
        ("--size-budget", config.size_budget is not None),
    ):
        if given and not int4:
            raise ConfigError(
                f"{flag} does not go with --scheme {config.scheme}.",
                hint="it applies to --scheme int4 (blocked 4-bit weights).",
            )
    if not int4:
        return
    if config.block_size is not None and config.block_size not in BLOCK_SIZE_CHOICES:
        raise ConfigError(
            f"--block-size {config.block_size} is not supported.",
            hint=f"choose from {', '.join(str(b) for b in BLOCK_SIZE_CHOICES)}.",
        )
    if config.size_budget is not None and not 0 <= config.size_budget <= 100:
        raise ConfigError(
            f"--size-budget {config.size_budget:g} is out of range.",
            hint="give a percent of the float model's file size, 0 to 100 (0: all 4 bits).",
        )
    if config.accuracy_level is not None and config.accuracy_level not in range(5):
        raise ConfigError(
            f"--accuracy-level {config.accuracy_level} is out of range.",
            hint="choose from 0 to 4 (4: int8 compute, the fastest on CPU).",
        )
    if config.accuracy_level is not None and config.format.value != "qop":
        raise ConfigError(
            "--accuracy-level does not go with --format qdq.",
            hint="it is an attribute of MatMulNBits, which --format qop writes.",
        )
    if config.int4_kernel is not None and config.int4_kernel not in INT4_KERNELS:
        raise ConfigError(
            f"--int4-kernel {config.int4_kernel} is not supported.",
            hint=f"choose from {', '.join(INT4_KERNELS)}.",
        )
    if config.int4_kernel is not None and config.format.value != "qop":
        raise ConfigError(
            "--int4-kernel does not go with --format qdq.",
            hint="it chooses the operator --format qop writes.",
        )
    if config.int4_kernel == "int8" and config.asymmetric_weights:
        raise ConfigError(
            "--int4-kernel int8 does not go with --asymmetric-weights.",
            hint="its int8 GEMM reads symmetric weights; leave one of them out.",
        )
    if config.int4_kernel == "int8" and config.accuracy_level is not None:
        raise ConfigError(
            "--accuracy-level does not go with --int4-kernel int8.",
            hint="it is an attribute of MatMulNBits; the int8 kernel always computes in int8.",
        )
    if not config.per_channel:
        raise ConfigError(
            "--per-tensor does not go with --scheme int4: its weights have one scale per "
            "block.",
            hint="choose the block with --block-size.",
        )
