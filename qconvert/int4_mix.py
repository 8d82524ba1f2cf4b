"""Mixed precision inside a size budget: which int4 layers to keep at 8 bits (with `--data`).

4-bit weights do not cost the same everywhere: on a 6-layer sentence encoder, one layer's 4-bit
weight alone moves the sentence embedding 100 times as much as another's, and a small
384 x 384 projection can matter more than a 384 x 1536 one. So, with samples, each
candidate layer's weight is rounded as the run rounds it (`int4_rounding`) and put alone
into the float model; the model's output error on the held-out samples,

    gain = sum over samples and outputs of ||y_layer - y||^2 / ||y||^2,

is what keeping that layer at 8 bits would win back (an 8-bit weight's error is some 200
times smaller, so it is left out). Layers are then taken in order of gain per extra byte
in the file while the projected file stays within the budget, a share of the float
model's file size. The errors of single layers add up nearly exactly on transformers
(that encoder: 0.0294 summed against 0.0305 with every layer at 4 bits), which is what makes
the greedy choice by single-layer gains sound.

A kept layer costs what its 8-bit form adds over its 4-bit one (`layer_bytes`): on the
int8 kernel (`passes.int4` rule 4) an int8 weight with one scale per column, read by the
same DynamicQuantizeMatMul, so its speed is unchanged; on MatMulNBits, 8-bit blocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnx

from qconvert.runtime import make_session

DEFAULT_SIZE_BUDGET = 17.0
"""Percent of the float model's file size the int4 file may reach by keeping layers at 8
bits (`--size-budget`): 4-bit blocks of 32 come to about 15% on MatMul-dominated models,
which leaves room for a few of the layers whose 4 bits cost most."""

MAX_HELD_SAMPLES = 8
"""Held-out samples the gains are measured on: one run per sample and candidate layer."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """A layer that may be kept at 8 bits.

    Attributes:
        node: the node's name.
        gain: the held-out output error its 4-bit weight adds (module docstring).
        extra_bytes: what its 8-bit form adds to the file over its 4-bit form.
    """

    node: str
    gain: float
    extra_bytes: int


def layer_bytes(
    n: int, k: int, *, bits: int, block_size: int, kernel: str, symmetric: bool = True
) -> int:
    """The bytes a MatMul/Gemm weight (K, N) takes in the file, as `passes.int4` writes it."""
    blocks = -(-k // block_size)
    if kernel == "int8" and symmetric:
        if bits == 8:
            return k * n + 4 * n  # int8 values, a float scale per column
        return blocks * block_size * n // 2 + blocks * n + 4 * n  # codes, multipliers, units
    codes = n * blocks * block_size * bits // 8
    zero_points = 0 if symmetric else n * -(-blocks * bits // 8)
    return codes + 4 * n * blocks + zero_points


def structure_bytes(weight: str, *, kernel: str) -> int:
    """An allowance for what the rewrite adds around one weight besides its tensors.

    The nodes, their attributes and the names derived from the weight's: on the int8
    kernel, the Cast/Mul/Reshape chain that rebuilds the int8 weight (about 400 bytes with a
    2-letter name on a graph built in the tests), else one node (about 160). Counted
    generously, so that the file stays within the budget.
    """
    if kernel == "int8":
        return 512 + 10 * len(weight.encode())
    return 256 + 4 * len(weight.encode())


def choose(candidates: Iterable[Candidate], room: int) -> tuple[Candidate, ...]:
    """The candidates to keep at 8 bits: best gain per extra byte first, while they fit.

    A candidate that does not fit in what is left is passed over for smaller ones after it.
    Ties go by name, so the choice does not depend on the order given.
    """
    ranked = sorted(
        (c for c in candidates if c.gain > 0 and c.extra_bytes > 0),
        key=lambda c: (-c.gain / c.extra_bytes, c.node),
    )
    chosen = []
    for candidate in ranked:
        if candidate.extra_bytes <= room:
            chosen.append(candidate)
            room -= candidate.extra_bytes
    return tuple(chosen)


def output_gains(
    model: onnx.ModelProto,
    replacements: Iterable[tuple[str, Mapping[str, npt.NDArray[np.float32]]]],
    replaced: Iterable[str],
    samples: Sequence[Mapping[str, np.ndarray]],
) -> dict[str, float]:
    """Per (key, group) of `replacements`, the model's output error with `group` replaced.

    A group maps initializer names (all among `replaced`) to the values the quantized layer
    stands for; `replacements` may make them one at a time, so that one layer's float copy
    is held at once. The `replaced` initializers become graph inputs of one session, so
    each layer is measured with one run per sample and no model rebuilt. The error is
    summed over samples and float outputs, each output's squared error relative to its
    energy.
    """
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    listed = {value.name for value in proto.graph.input}
    inits = {tensor.name: tensor for tensor in proto.graph.initializer}
    for name in sorted(set(replaced) - listed):
        tensor = inits[name]
        proto.graph.input.append(
            onnx.helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims))
        )
    session = make_session(proto.SerializeToString(), quiet=True)
    outputs = [
        o.name for o in session.get_outputs() if o.type in ("tensor(float)", "tensor(double)")
    ]
    references = [session.run(outputs, dict(sample)) for sample in samples]
    gains = {}
    for key, group in replacements:
        total = 0.0
        for sample, reference in zip(samples, references, strict=True):
            results = session.run(outputs, {**sample, **group})
            for got, want in zip(results, reference, strict=True):
                want64 = np.asarray(want, np.float64)
                finite = np.isfinite(want64)  # NaN in float already says nothing
                want64 = np.where(finite, want64, 0.0)
                got64 = np.where(finite, np.asarray(got, np.float64), 0.0)
                energy = float(np.sum(want64 * want64))
                if energy > 0:
                    total += float(np.nansum((got64 - want64) ** 2)) / energy
        gains[key] = total
    return gains
