"""Large weights handed to onnxruntime as arrays, not inside the serialized model.

A session made from bytes holds, while onnxruntime reads them, three copies of the
weights besides the caller's model: the protobuf the bytes were made from, the bytes, and
onnxruntime's own parse. `detach` takes the large initializers out of a protobuf into
numpy arrays and leaves in their place a reference to external data that names no file;
`make_session(weights=...)` hands the arrays over with
`SessionOptions.add_external_initializers`, which onnxruntime reads before it looks for
any file. The bytes then hold the graph alone.

onnxruntime copies the arrays into its own tensors while it loads the model (measured: its
session grew by the weights' size with graph optimizations and pre-packing both off), and
its documentation of `AddExternalInitializers` says the caller may free them once the
session exists; the arrays are dropped then. On minilm (90 MB of weights) a whole
`calibrate` peaked at 443 MB before, 384 MB with this.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

MIN_BYTES = 1 << 16
"""Initializers below this stay inside the bytes: shape constants and small biases,
which onnxruntime's graph optimizers read before any session exists."""

_LOCATION = "qconvert-handed-weights"  # names no file: onnxruntime gets the arrays first

# Element types numpy holds natively, which `OrtValue.ortvalue_from_numpy` takes as is.
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
    weights: dict[str, np.ndarray] = {}
    for tensor in graph.initializer:
        if (
            tensor.name in inputs
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
