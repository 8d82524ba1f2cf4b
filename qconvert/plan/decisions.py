"""What a plan decides, as plain immutable data: per tensor, per node, per fold."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from qconvert import qparams
from qconvert.schemes import (
    Scheme,
)


class Role(str, Enum):
    """What a quantized tensor is to the node that reads it."""

    ACTIVATION = "activation"
    WEIGHT = "weight"
    BIAS = "bias"


@dataclass(frozen=True, slots=True)
class TensorDecision:
    """How one tensor is quantized, and why."""

    name: str
    role: Role
    qparams: qparams.QParams
    reason: str
    scale_product_of: tuple[str, str] | None = None
    """A bias's scale is its layer's input scale x weight scale: the (input, weight) names.

    The QDQ pass then writes the scale as that product, not as a copy of it."""


@dataclass(frozen=True, slots=True)
class NodeDecision:
    """Whether one node runs quantized (or in float16), and why."""

    name: str
    op_type: str
    quantized: bool
    reason: str


@dataclass(frozen=True, slots=True)
class ClampFold:
    """Relu/Clip nodes dropped because the quantization already clamps as they do.

    Quantizing `source` with the parameters of `output` (the last clamp's output) clamps
    as the nodes do.
    """

    nodes: tuple[str, ...]
    source: str
    output: str


@dataclass(frozen=True, slots=True)
class ScaleFold:
    """A Mul of `source` by a positive constant, dropped.

    `output` is read as DequantizeLinear(source's integers) at source's scale times that
    constant, which is exactly the product (x_q - z) * s * c.
    """

    node: str
    source: str
    output: str


@dataclass(frozen=True, slots=True)
class QuantPlan:
    """The decisions for a whole model; the rewrite passes only apply them.

    Attributes:
        scheme: the run's scheme (single nodes may differ through overrides).
        tensors: quantized tensors by name.
        nodes: every node of the main graph, converted or not, with the reason, in graph
            order.
        folds: Relu/Clip nodes absorbed by the quantization of their output.
        format: how the result is written: qdq, qop, dynamic or float16.
        float16_tensors: initializers stored as float16 (fp16 and fp16-weights).
        notes: facts about the run the report states (what was done, and caveats).
        float_readers: float nodes that read the float tensors, not their dequantized
            copies: the nodes the user left float, and float nodes with weights, which
            onnxruntime would otherwise fuse with a DequantizeLinear input into an
            integer kernel. Where the tensor's quantization absorbed a Relu/Clip, they
            read the clamp's output, and the clamp stays for them.
        scale_folds: Muls by a positive constant absorbed by the scale of their input.
    """

    scheme: Scheme
    tensors: Mapping[str, TensorDecision]
    nodes: tuple[NodeDecision, ...]
    folds: tuple[ClampFold, ...]
    format: str = "qdq"
    float16_tensors: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    float_readers: frozenset[str] = frozenset()
    scale_folds: tuple[ScaleFold, ...] = ()

    def quantized_nodes(self) -> tuple[NodeDecision, ...]:
        """The nodes that run on quantized inputs (or in float16)."""
        return tuple(node for node in self.nodes if node.quantized)

    def float_nodes(self) -> tuple[NodeDecision, ...]:
        """The nodes left in float, each with the reason."""
        return tuple(node for node in self.nodes if not node.quantized)
