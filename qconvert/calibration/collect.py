"""Run the float model in onnxruntime with chosen intermediate tensors exposed as outputs."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx
import onnx_ir as ir

from qconvert import ops
from qconvert.calibration.observers import MinMaxObserver, TensorRange
from qconvert.dataset import Sample
from qconvert.errors import CalibrationDataError, ModelLoadError
from qconvert.runtime import describe_error, make_session

_FLOAT_TYPES = {
    ir.DataType.FLOAT,
    ir.DataType.FLOAT16,
    ir.DataType.DOUBLE,
    ir.DataType.BFLOAT16,
}
_INVOLVED_OPS = set(ops.QUANTIZED) | ops.PASS_THROUGH | ops.CLAMPS


def tensors_to_calibrate(model: ir.Model) -> tuple[str, ...]:
    """Names of the float activations that any scheme might quantize.

    These are the non-constant inputs and outputs of every node whose op type the policy
    table knows. Calibrating all of them once lets one calibration serve every scheme and
    every exclusion.
    """
    names: dict[str, None] = {}
    for node in model.graph:
        if node.op_type not in _INVOLVED_OPS:
            continue
        for value in (*node.inputs, *node.outputs):
            if value is None or not value.name or value.const_value is not None:
                continue
            if value.dtype is not None and value.dtype not in _FLOAT_TYPES:
                continue
            names[value.name] = None
    return tuple(names)


def calibrate_tensors(
    model: ir.Model,
    samples: Iterable[Sample],
    tensor_names: Iterable[str],
    *,
    on_sample: Callable[[], None] | None = None,
) -> dict[str, TensorRange]:
    """Streams `samples` through `model` and returns the range of each tensor."""
    tensor_names = tuple(tensor_names)
    try:
        session = make_session(_expose(model, tensor_names))
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class
        raise ModelLoadError(f"onnxruntime cannot load the model: {describe_error(exc)}") from None
    observers = {name: MinMaxObserver() for name in tensor_names}
    for sample in samples:
        try:
            outputs = session.run(tensor_names, sample.feeds)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class
            raise CalibrationDataError(
                f"onnxruntime failed on sample '{sample.source}': {describe_error(exc)}"
            ) from None
        for name, array in zip(tensor_names, outputs, strict=True):
            observers[name].update(np.asarray(array))
        if on_sample is not None:
            on_sample()
    return {name: observer.finalize() for name, observer in observers.items()}


def _expose(model: ir.Model, tensor_names: tuple[str, ...]) -> bytes:
    """The model's bytes with `tensor_names` added as graph outputs."""
    dtypes = {
        value.name: value.dtype
        for value in (
            *model.graph.inputs,
            *(out for node in model.graph for out in node.outputs),
        )
    }
    proto = ir.serde.serialize_model(model)
    existing = {output.name for output in proto.graph.output}
    for name in tensor_names:
        if name not in existing:
            # An output needs only its name and element type; onnxruntime infers the shape.
            dtype = dtypes.get(name) or ir.DataType.FLOAT
            proto.graph.output.append(
                onnx.helper.make_tensor_value_info(name, int(dtype), None)
            )
    return proto.SerializeToString()
