"""Per-layer comparison: where in the network the candidate drifts from the reference.

Both models run with matching intermediate tensors exposed as extra outputs, and each pair
is measured like a model output (SQNR, cosine, max abs error; see `metrics`).

Matching, for every float tensor T that a node of the reference writes:

1. the candidate holds `T_dequantized` written by a DequantizeLinear: compare with that
   (qconvert's QDQ output keeps float names; a quantized tensor is read through its DQ);
2. else the candidate has a tensor named T: compare with it (other tools' QDQ output, fp16
   models, a model against itself);
3. else T has no counterpart and is skipped.

The layer a pair belongs to is the candidate node that computes it: the producer of the
matched tensor, looking through QuantizeLinear/DequantizeLinear. That is the node to
exclude from quantization. Each layer is listed once, with its worst tensor; the list is
sorted by SQNR, worst first.

Exposing a tensor stops onnxruntime from fusing across it (a Conv between Q and DQ then
runs in float on dequantized values), so per-layer numbers can differ slightly from the
whole-model ones. Errors accumulate through the network: a layer's SQNR includes the noise
of every layer before it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx

from qconvert.metrics import OutputAccumulator

DEQUANTIZED_SUFFIX = "_dequantized"
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
_FLOAT_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.BFLOAT16,
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorPair:
    """A reference tensor, its counterpart in the candidate, and the candidate's node."""

    node: str
    op_type: str
    reference_tensor: str
    candidate_tensor: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerMetrics:
    """How far one layer's output in the candidate is from the reference's."""

    node: str
    op_type: str
    tensor: str
    candidate_tensor: str
    sqnr_db: float
    cosine: float
    max_abs_error: float
    mean_abs_error: float


class LayerComparison:
    """Matches two models' tensors, exposes them, and streams their differences."""

    def __init__(self, reference: onnx.ModelProto, candidate: onnx.ModelProto) -> None:
        reference = onnx.shape_inference.infer_shapes(reference)
        candidate = onnx.shape_inference.infer_shapes(candidate)
        self.pairs = match_tensors(reference, candidate)
        self.reference_model = expose(reference, [p.reference_tensor for p in self.pairs])
        self.candidate_model = expose(candidate, [p.candidate_tensor for p in self.pairs])
        self._accumulators = [OutputAccumulator(p.reference_tensor) for p in self.pairs]

    @property
    def reference_names(self) -> list[str]:
        """The reference tensors to fetch, in pair order."""
        return [pair.reference_tensor for pair in self.pairs]

    @property
    def candidate_names(self) -> list[str]:
        """The candidate tensors to fetch, in pair order."""
        return [pair.candidate_tensor for pair in self.pairs]

    def update(self, reference: list[np.ndarray], candidate: list[np.ndarray]) -> None:
        """Adds one sample's tensors, fetched in pair order."""
        for accumulator, ref, cand in zip(
            self._accumulators, reference, candidate, strict=True
        ):
            if np.shape(ref) == np.shape(cand):
                accumulator.update(ref, cand)

    def result(self) -> tuple[LayerMetrics, ...]:
        """One entry per layer (its worst tensor), worst SQNR first."""
        worst: dict[str, LayerMetrics] = {}
        for pair, accumulator in zip(self.pairs, self._accumulators, strict=True):
            if not accumulator.count:
                continue
            metrics = accumulator.result()
            layer = LayerMetrics(
                node=pair.node,
                op_type=pair.op_type,
                tensor=pair.reference_tensor,
                candidate_tensor=pair.candidate_tensor,
                sqnr_db=metrics.sqnr_db,
                cosine=metrics.cosine,
                max_abs_error=metrics.max_abs_error,
                mean_abs_error=metrics.mean_abs_error,
            )
            known = worst.get(pair.node)
            if known is None or _order(layer) < _order(known):
                worst[pair.node] = layer
        return tuple(sorted(worst.values(), key=_order))


def match_tensors(
    reference: onnx.ModelProto, candidate: onnx.ModelProto
) -> tuple[TensorPair, ...]:
    """The pairs of tensors to compare, in the reference's node order (see module doc)."""
    reference_types = _element_types(reference)
    producers = {
        output: node for node in candidate.graph.node for output in node.output if output
    }
    pairs = []
    for node in reference.graph.node:
        if node.op_type == "Constant":
            continue
        for tensor in node.output:
            if not tensor or reference_types.get(tensor) not in _FLOAT_TYPES:
                continue
            dequantized = producers.get(tensor + DEQUANTIZED_SUFFIX)
            if dequantized is not None and dequantized.op_type == "DequantizeLinear":
                match = tensor + DEQUANTIZED_SUFFIX
            elif tensor in producers:
                match = tensor
            else:
                continue
            computing = _computing_node(match, producers)
            if computing is None:
                continue
            pairs.append(
                TensorPair(
                    node=computing.name or computing.output[0],
                    op_type=computing.op_type,
                    reference_tensor=tensor,
                    candidate_tensor=match,
                )
            )
    return tuple(pairs)


def expose(model: onnx.ModelProto, tensors: Iterable[str]) -> bytes:
    """The model's bytes with `tensors` added as graph outputs (shapes left to onnxruntime)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    types = _element_types(model)
    existing = {output.name for output in exposed.graph.output}
    for name in tensors:
        if name not in existing:
            element_type = types.get(name, onnx.TensorProto.FLOAT)
            exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, element_type, None))
            existing.add(name)
    return exposed.SerializeToString()


def _computing_node(tensor: str, producers: dict[str, onnx.NodeProto]) -> onnx.NodeProto | None:
    node = producers.get(tensor)
    while node is not None and node.op_type in _QDQ_OPS:
        node = producers.get(node.input[0])
    return node


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    return {
        info.name: info.type.tensor_type.elem_type
        for info in (*graph.input, *graph.value_info, *graph.output)
        if info.type.HasField("tensor_type")
    }


def _order(layer: LayerMetrics) -> tuple[float, str]:
    # NaN sorts first: a layer that produced NaN is the worst of all.
    sqnr = -np.inf if np.isnan(layer.sqnr_db) else layer.sqnr_db
    return (sqnr, layer.node)
