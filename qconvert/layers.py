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
exclude from quantization.

Two numbers per tensor:

- SQNR: the candidate as it runs, against the reference. Errors accumulate through the
  network, so this includes the noise of every layer before, and the last layers look worst
  whatever their own share.
- local SQNR: the layer alone. A third session runs the candidate cut at every tensor both
  models name alike: each reader of such a tensor T reads the reference's T instead of the
  candidate's. A layer then sees exact inputs (quantized again by its own Q/DQ, as in the
  candidate), and its output error is its own: input and weight rounding, integer kernel,
  output rounding.

Each layer is listed once, with its worst tensor by local SQNR, and the list is sorted by
local SQNR, worst first: the top entry is the node whose own quantization costs the most.
Exposing a tensor stops onnxruntime from fusing across it (a Conv between Q and DQ then
runs in float on dequantized values), so per-layer numbers can differ slightly from the
whole-model ones.
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
    position: int = -1
    """The index of the reference node writing the tensor, in graph order."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerMetrics:
    """How far one layer's output in the candidate is from the reference's."""

    node: str
    op_type: str
    tensor: str
    candidate_tensor: str
    local_sqnr_db: float
    sqnr_db: float
    cosine: float
    max_abs_error: float
    mean_abs_error: float
    position: int = -1
    """Where the layer sits: the index of its reference node in graph order, so a report
    can draw the error as it accumulates from input to output."""


class LayerComparison:
    """Matches two models' tensors, exposes them, and streams their differences.

    Three models come out: the reference and the candidate with the matched tensors
    exposed, and the candidate cut at the shared names (see the module docstring), whose
    extra inputs are fed from the reference run.
    """

    def __init__(self, reference: onnx.ModelProto, candidate: onnx.ModelProto) -> None:
        reference = onnx.shape_inference.infer_shapes(reference)
        candidate = onnx.shape_inference.infer_shapes(candidate)
        self.pairs = match_tensors(reference, candidate)
        self.cuts = shared_tensors(reference, candidate)
        self.reference_names = list(
            dict.fromkeys([*(p.reference_tensor for p in self.pairs), *self.cuts])
        )
        self.candidate_names = [pair.candidate_tensor for pair in self.pairs]
        self.reference_model = expose(reference, self.reference_names)
        self.candidate_model = expose(candidate, self.candidate_names)
        candidate_types = _element_types(candidate)
        isolated, self.cut_inputs = cut(candidate, self.cuts, candidate_types)
        self.isolated_model = expose(isolated, self.candidate_names)
        # The reference's values go in as the candidate's type (an fp16 model reads fp16).
        self._cut_dtypes = {
            tensor: onnx.helper.tensor_dtype_to_np_dtype(
                candidate_types.get(tensor, onnx.TensorProto.FLOAT)
            )
            for tensor in self.cuts
        }
        self._whole = [
            OutputAccumulator(p.reference_tensor, classify=False) for p in self.pairs
        ]
        self._local = [
            OutputAccumulator(p.reference_tensor, classify=False) for p in self.pairs
        ]

    def isolated_feeds(
        self, feeds: dict[str, np.ndarray], reference: list[np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The feeds of the cut candidate: the sample's, plus the reference's tensors."""
        values = dict(zip(self.reference_names, reference, strict=True))
        return {
            **feeds,
            **{
                name: np.asarray(values[tensor], dtype=self._cut_dtypes[tensor])
                for tensor, name in self.cut_inputs.items()
            },
        }

    def update(
        self,
        reference: list[np.ndarray],
        candidate: list[np.ndarray],
        isolated: list[np.ndarray],
    ) -> None:
        """Adds one sample's tensors.

        The reference's come in `reference_names` order; the candidate's and the cut
        candidate's in `candidate_names` order.
        """
        values = dict(zip(self.reference_names, reference, strict=True))
        for pair, whole, local, cand, alone in zip(
            self.pairs, self._whole, self._local, candidate, isolated, strict=True
        ):
            ref = values[pair.reference_tensor]
            if np.shape(ref) == np.shape(cand) == np.shape(alone):
                whole.update(ref, cand)
                local.update(ref, alone)

    def result(self) -> tuple[LayerMetrics, ...]:
        """One entry per layer (its worst tensor), worst local SQNR first."""
        worst: dict[str, LayerMetrics] = {}
        for pair, whole, local in zip(self.pairs, self._whole, self._local, strict=True):
            if not whole.count:
                continue
            metrics = whole.result()
            layer = LayerMetrics(
                node=pair.node,
                op_type=pair.op_type,
                tensor=pair.reference_tensor,
                candidate_tensor=pair.candidate_tensor,
                local_sqnr_db=local.result().sqnr_db,
                sqnr_db=metrics.sqnr_db,
                cosine=metrics.cosine,
                max_abs_error=metrics.max_abs_error,
                mean_abs_error=metrics.mean_abs_error,
                position=pair.position,
            )
            known = worst.get(pair.node)
            if known is None or _order(layer) < _order(known):
                worst[pair.node] = layer
        return tuple(sorted(worst.values(), key=_order))


def shared_tensors(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> list[str]:
    """Float tensors that nodes of both models write under the same name."""
    reference_types = _element_types(reference)
    written = {output for node in candidate.graph.node for output in node.output}
    return [
        tensor
        for node in reference.graph.node
        if node.op_type != "Constant"
        for tensor in node.output
        if tensor in written and reference_types.get(tensor) in _FLOAT_TYPES
    ]


def cut(
    model: onnx.ModelProto, tensors: list[str], types: dict[str, int]
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of `model` whose nodes read each of `tensors` from a new graph input.

    The producers still write the tensors (so they can be measured); only the readers
    change. Returns the copy and {tensor: new input name}.
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    taken = {name for node in result.graph.node for name in (*node.input, *node.output)}
    taken |= {value.name for value in result.graph.input}
    inputs: dict[str, str] = {}
    for tensor in tensors:
        name, counter = f"{tensor}.reference", 0
        while name in taken:
            counter += 1
            name = f"{tensor}.reference_{counter}"
        taken.add(name)
        inputs[tensor] = name
        result.graph.input.append(
            onnx.helper.make_tensor_value_info(
                name, types.get(tensor, onnx.TensorProto.FLOAT), None
            )
        )
    for node in result.graph.node:
        for index, name in enumerate(node.input):
            if name in inputs:
                node.input[index] = inputs[name]
    return result, inputs


def match_tensors(
    reference: onnx.ModelProto, candidate: onnx.ModelProto
) -> tuple[TensorPair, ...]:
    """The pairs of tensors to compare, in the reference's node order (see module doc)."""
    reference_types = _element_types(reference)
    producers = {
        output: node for node in candidate.graph.node for output in node.output if output
    }
    pairs = []
    for position, node in enumerate(reference.graph.node):
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
                    position=position,
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
            exposed.graph.output.append(
                onnx.helper.make_tensor_value_info(name, element_type, None)
            )
            existing.add(name)
    return exposed.SerializeToString()


def _computing_node(
    tensor: str, producers: dict[str, onnx.NodeProto]
) -> onnx.NodeProto | None:
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


def _order(layer: LayerMetrics) -> tuple[float, float, str]:
    # NaN sorts first: a layer that produced NaN is the worst of all.
    local = -np.inf if np.isnan(layer.local_sqnr_db) else layer.local_sqnr_db
    whole = -np.inf if np.isnan(layer.sqnr_db) else layer.sqnr_db
    return (local, whole, layer.node)
