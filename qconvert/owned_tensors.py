"""Gives every tensor of a loaded model its own bytes, so the file's protobuf can go.

`onnx_ir.load` leaves each tensor a view of the protobuf it parsed (`TensorProtoTensor`),
and with protobuf's C implementation one such view keeps the whole parsed message alive:
a single small Constant held every weight of the file. Worse, `TensorProtoTensor.numpy()`
copies the tensor's bytes out of the message on every call (measured: reading every
initializer of a 90 MB sentence encoder twice held 86 MB twice over). Each stage that
hands onnxruntime the weights as arrays (`handed_weights`: calibration, the recipe's
scoring, the weight passes' float runs) so paid a copy of every weight it had not
changed, on top of the message.

`own_tensors` swaps each such tensor for one that owns its bytes:

1. a plain tensor (name, type, dims and `raw_data` only, of a type numpy holds) becomes an
   `ir.Tensor` over one read-only array of its bytes: later reads are that array, no copy,
   and it serializes to the same fields, so written models are unchanged byte for byte;
2. any other (typed fields such as `float_data`, external data, metadata) gets a
   protobuf message of its own, copied field for field.

Initializers and tensor attributes (Constant values) of every graph, subgraph and
function are swapped. The file's message is then unreferenced and freed: the model holds
one copy of its weights, where it held the message and, at each read, a copy more.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx
import onnx_ir as ir

_PLAIN_FIELDS = frozenset({"dims", "data_type", "name", "raw_data"})
"""The fields an `ir.Tensor` of an array writes back exactly as they were read."""

ARRAY_DTYPES = frozenset(
    {
        ir.DataType.FLOAT,
        ir.DataType.DOUBLE,
        ir.DataType.FLOAT16,
        ir.DataType.INT8,
        ir.DataType.UINT8,
        ir.DataType.INT16,
        ir.DataType.UINT16,
        ir.DataType.INT32,
        ir.DataType.UINT32,
        ir.DataType.INT64,
        ir.DataType.UINT64,
        ir.DataType.BOOL,
    }
)
"""Element types numpy holds natively, so an array of the bytes is the tensor as is."""


def own_tensors(model: ir.Model) -> None:
    """Makes every tensor of `model` hold its own bytes (changed in place; see the module)."""
    for graph in _graphs(model):
        initializers = graph.initializers if isinstance(graph, ir.Graph) else {}
        for value in initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.serde.TensorProtoTensor):
                value.const_value = owned(tensor)
        for node in graph:
            for name, attribute in list(node.attributes.items()):
                if not isinstance(attribute, ir.Attr) or attribute.is_ref():
                    continue
                if attribute.type == ir.AttributeType.TENSOR:
                    value = owned(attribute.value)
                elif attribute.type == ir.AttributeType.TENSORS:
                    value = [owned(tensor) for tensor in attribute.value]
                else:
                    continue
                node.attributes[name] = ir.Attr(
                    name, attribute.type, value, doc_string=attribute.doc_string
                )


def owned(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    """`tensor`, holding its own bytes when it is a view of a protobuf (see the module)."""
    if not isinstance(tensor, ir.serde.TensorProtoTensor):
        return tensor
    proto = tensor.raw
    fields = _present_fields(proto)
    plain = fields <= _PLAIN_FIELDS and "raw_data" in fields
    if plain and tensor.dtype in ARRAY_DTYPES and (proto.name or "name" not in fields):
        # numpy() reads raw_data into bytes of its own: the array is the one copy.
        return ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=proto.name or None)
    own = onnx.TensorProto()
    own.CopyFrom(proto)
    return ir.serde.TensorProtoTensor(own)


def _present_fields(proto: onnx.TensorProto) -> set[str]:
    """The names of the fields `proto` holds, its bytes not read.

    `ListFields` would do, but it returns each field's value, and the value of `raw_data` is
    a copy of the tensor's bytes: on a 90 MB sentence encoder that was 106 ms of a load
    (and 90 MB copied) only to learn the names; asking each field costs 1 ms.
    """
    held = set()
    for field in proto.DESCRIPTOR.fields:
        try:
            present = proto.HasField(field.name)
        except ValueError:  # a repeated field (protobuf 7 dropped `label` to tell them)
            present = len(getattr(proto, field.name)) > 0
        if present:
            held.add(field.name)
    return held


def _graphs(model: ir.Model) -> Iterator[ir.Graph | ir.Function]:
    """The main graph, every subgraph in it, and every function with theirs."""
    yield model.graph
    roots = [model.graph, *model.functions.values()]
    for root in roots:
        if root is not model.graph:
            yield root
        for node in ir.traversal.RecursiveGraphIterator(root):
            for attribute in node.attributes.values():
                if not isinstance(attribute, ir.Attr) or attribute.is_ref():
                    continue
                if attribute.type == ir.AttributeType.GRAPH:
                    yield attribute.value
                elif attribute.type == ir.AttributeType.GRAPHS:
                    yield from attribute.value
