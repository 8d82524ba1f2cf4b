"""Large weights handed to onnxruntime as arrays, not inside the serialized model.

A session made from bytes holds, while onnxruntime reads them, three copies of the
weights besides the caller's model: the protobuf the bytes were made from, the bytes, and
onnxruntime's own parse. `detach` takes the large initializers out of a protobuf into
numpy arrays and leaves in their place a reference to external data that names no file;
`make_session(weights=...)` hands the arrays over with
`SessionOptions.add_external_initializers`, which onnxruntime reads before it looks for
any file. The bytes then hold the graph alone.

onnxruntime copies the arrays into its own tensors while it loads the model (measured: its
session grew by the weights' size with graph optimizations and pre-packing both off), and its
documentation of `AddExternalInitializers` says the caller may free them once the session
exists; the arrays are dropped then. On a sentence encoder of 90 MB of weights a whole
`calibrate` peaked at 443 MB before, 384 MB with this.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

MIN_BYTES = 1 << 16
"""Initializers below this stay inside the bytes: shape constants and small biases,
which onnxruntime's graph optimizers read before any session exists."""

_LOCATION = "qconvert-handed-weights"  # names no file: onnxruntime gets the arrays first

# Element types numpy holds natively, which `OrtValue.ortvalue_from_numpy` takes as is.
_HANDED_DTYPES = frozenset(
    {
        ir.DataType.FLOAT,
        ir.DataType.DOUBLE,
        ir.DataType.FLOAT16,
        ir.DataType.INT8,
        ir.DataType.UINT8,
        ir.DataType.INT32,
        ir.DataType.INT64,
    }
)
_HANDED_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.INT8,
        onnx.TensorProto.UINT8,
        onnx.TensorProto.INT32,
        onnx.TensorProto.INT64,
    }
)


def detach(proto: onnx.ModelProto, *, min_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Moves the main graph's large initializers out of `proto` (changed in place).

    Only initializers whose values sit in `raw_data` and that no graph input shadows (an
    old model's overridable default) move. Returns them by name, for
    `make_session(weights=...)`. `min_bytes` defaults to `MIN_BYTES`.
    """
    min_bytes = MIN_BYTES if min_bytes is None else min_bytes
    graph = proto.graph
    inputs = {value.name for value in graph.input}
    read = _names_read(graph)
    weights: dict[str, np.ndarray] = {}
    for tensor in graph.initializer:
        if (
            tensor.name in inputs
            or tensor.name not in read
            or tensor.data_type not in _HANDED_TYPES
            or tensor.data_location == onnx.TensorProto.EXTERNAL
            or len(tensor.raw_data) < min_bytes
        ):
            continue
        weights[tensor.name] = np.ascontiguousarray(numpy_helper.to_array(tensor))
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (
            ("location", _LOCATION),
            ("offset", "0"),
            ("length", str(weights[tensor.name].nbytes)),
        ):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    return weights


def serialize_detached(
    model: ir.Model, *, min_bytes: int | None = None
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """`model` serialized without its main graph's large initializers, and those as arrays.

    What `detach(ir.serde.serialize_model(model))` gives, without copying the weights into
    the protobuf and out again: the arrays are the model's own tensors (`ir.Tensor.numpy`,
    no copy where a tensor holds an array), and the protobuf never holds them. On the
    bench's 224x224 residual CNN (46 MB of weights) that is two copies of the weights less, and
    their time, before a calibration session. `model` is left as it was.
    """
    min_bytes = MIN_BYTES if min_bytes is None else min_bytes
    graph = model.graph
    inputs = {value.name for value in graph.inputs}
    weights: dict[str, np.ndarray] = {}
    stand_ins: dict[ir.Value, ir.TensorProtocol] = {}
    for name, value in graph.initializers.items():
        tensor = value.const_value
        if (
            tensor is None
            or name in inputs
            or not (value.uses() or value.is_graph_output())
            or tensor.dtype not in _HANDED_DTYPES
            or isinstance(tensor, ir.ExternalTensor)
            or (isinstance(tensor, ir.TensorProtoTensor) and _external(tensor.raw))
            or tensor.nbytes < min_bytes
        ):
            continue
        array = np.ascontiguousarray(tensor.numpy())
        weights[name] = array
        stand_ins[value] = ir.ExternalTensor(
            _LOCATION, 0, array.nbytes, tensor.dtype, shape=tensor.shape, name=name
        )
    with _swapped(stand_ins):
        proto = ir.serde.serialize_model(model)
    return proto, weights


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every name a node of `graph` or of its subgraphs reads, and the graph's outputs.

    An initializer nothing reads is not handed over: onnxruntime drops it from the graph
    before it takes the handed arrays, and then fails on the name it no longer has
    ("Failed to find existing initializer"). Preparation's folds leave such initializers
    (a weight replaced by its folded copy), and so do some exporters.
    """
    names = {value.name for value in graph.output}
    for node in graph.node:
        names.update(node.input)
        for attribute in node.attribute:
            for subgraph in (
                *attribute.graphs,
                *([attribute.g] if attribute.HasField("g") else []),
            ):
                names |= _names_read(subgraph)
    return names


def _external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


@contextlib.contextmanager
def _swapped(stand_ins: dict[ir.Value, ir.TensorProtocol]) -> Iterator[None]:
    """Each value's tensor replaced by its stand-in while the block runs."""
    originals = {value: value.const_value for value in stand_ins}
    try:
        for value, stand_in in stand_ins.items():
            value.const_value = stand_in
        yield
    finally:
        for value, original in originals.items():
            value.const_value = original


def serialized(model: ir.Model) -> tuple[bytes, dict[str, np.ndarray]]:
    """`model`'s graph as bytes and its large weights as arrays, for `make_session`.

    For the sessions built once per candidate (the recipe's and the range check's scoring):
    from the whole model's bytes, onnxruntime's build held the bytes, its parse of them
    and its own tensors at once; from these, the arrays and its tensors.
    """
    proto, weights = serialize_detached(model)
    return proto.SerializeToString(), weights
