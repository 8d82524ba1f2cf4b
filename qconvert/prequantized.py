"""Models that arrive already quantized: how to tell them, and which ones qconvert refuses.

A *pre-quantized* model carries QuantizeLinear/DequantizeLinear pairs (ai.onnx or
onnxruntime's com.microsoft domain) and no integer operator: the form quantization-aware
training exports take, with the trained ranges as the pairs' scales and zero points.
qconvert finishes such a model (`qconvert.pipelines.prequantized`) instead of quantizing
it again.

Refused, with a message that says what was found:

1. integer operators (QLinearConv, MatMulInteger, DynamicQuantizeLinear, ...): the model
   was converted already and qconvert does not turn it back;
2. fake quantization spelled out in float ops, `x / s -> Round -> Clip -> * s` and its
   variants: the ranges are buried in arithmetic that no tool can read back reliably.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import onnx
import onnx_ir as ir

from qconvert import ops
from qconvert.errors import UnsupportedModelError

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
QDQ_DOMAINS = frozenset({"", "ai.onnx", "com.microsoft"})
INTEGER_OPS = ops.QUANTIZED_MARKERS - QDQ_OPS
_FAKE_QUANT_LINKS = frozenset({"Div", "Mul", "Add", "Sub", "Clip", "Cast"})
"""Float ops a spelled-out fake quantization chains around its Round."""


def is_qdq(node: ir.Node) -> bool:
    """True for a QuantizeLinear or DequantizeLinear of a domain qconvert recognises."""
    return node.op_type in QDQ_OPS and node.domain in QDQ_DOMAINS


def glance(path: str | os.PathLike[str]) -> bool:
    """True when the file holds Q/DQ nodes or a spelled-out fake quantization.

    A quick look without reading weights; a file that does not parse gives False and fails
    properly in the normal load.
    """
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
        if not {node.op_type for node in proto.graph.node} & (QDQ_OPS | {"Round"}):
            return False  # the common case, decided without building the graph
        model = ir.serde.deserialize_model(proto)
    except Exception:  # noqa: BLE001 - the normal load reports what is wrong with the file
        return False
    graph = model.graph
    return any(is_qdq(node) for node in graph) or fake_quantization(graph) is not None


def check_finishable(model: ir.Model, path: str | os.PathLike[str]) -> None:
    """Refuses a model qconvert cannot finish (see the module docstring).

    Raises:
        UnsupportedModelError: naming the file and the node found.
    """
    graph = model.graph
    chain = fake_quantization(graph)
    if chain is not None:
        spelled = " -> ".join(f"{node.op_type} '{node.name}'" for node in chain)
        raise UnsupportedModelError(
            f"Model '{path}' spells out fake quantization in float ops ({spelled}); "
            "qconvert reads trained ranges only from QuantizeLinear/DequantizeLinear pairs.",
            hint="export the model with QuantizeLinear/DequantizeLinear nodes (the ONNX "
            "export of a FakeQuantize model writes them), or start from the float model.",
        )
    marker = next((node for node in graph if node.op_type in INTEGER_OPS), None)
    if marker is not None:
        raise UnsupportedModelError(
            f"Model '{path}' is already quantized (it holds {marker.op_type} node "
            f"'{marker.name}'); qconvert finishes QuantizeLinear/DequantizeLinear models "
            "but does not convert integer operators again.",
            hint="start from the float model or its QDQ form.",
        )


def fake_quantization(graph: ir.Graph) -> tuple[ir.Node, ...] | None:
    """The first spelled-out fake quantization: a Round chained to a Clip and a scaling.

    The chain is followed from each Round through at most two single-reader float ops
    either way; it is fake quantization when it holds a Clip and a Mul or Div.
    """
    for node in graph:
        if node.op_type != "Round":
            continue
        before: list[ir.Node] = []
        value = node.inputs[0]
        while len(before) < 2 and value is not None:
            producer = value.producer()
            if producer is None or producer.op_type not in _FAKE_QUANT_LINKS:
                break
            before.insert(0, producer)
            value = producer.inputs[0]
        after: list[ir.Node] = []
        value = node.outputs[0]
        while len(after) < 2:
            consumers = value.consumers()
            if len(consumers) != 1 or consumers[0].op_type not in _FAKE_QUANT_LINKS:
                break
            after.append(consumers[0])
            value = consumers[0].outputs[0]
        chain = (*before, node, *after)
        types = {link.op_type for link in chain}
        if "Clip" in types and types & {"Mul", "Div"}:
            return chain
    return None


@dataclass(slots=True)
class Ledger:
    """What finishing did, tensor by tensor, for the report.

    finished: stored as integers, folded or fused; kept: left as the model had it (with
    why); refused: what qconvert could have finished but may not (with why).
    """

    finished: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
