"""The graphs calibration runs: which tensors it reads, and how they leave onnxruntime.

`tensors_to_calibrate` names the float activations any scheme might quantize;
`checked_body_tensors` keeps those inside If/Loop/Scan bodies only where they can be passed
out. A collector (`collect`) runs them on two graphs:

- the calibration graph (`calibration_graph`): each tensor read is reduced inside
  onnxruntime by the nodes `reducing` adds, right after the node that computes it; the
  tensors whose statistics follow exactly from another's are not read (`derived`);
- the raw graph (`exposed_model`): the model with the tensors as graph outputs, for the
  batches whose values the reductions cannot say.

The model reaches them as an onnx_ir model or, in a calibration worker, as bytes
(`SerializedModel`); `open_session` makes the sessions on either graph.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from qconvert import handed_weights, ops
from qconvert.calibration import reducing
from qconvert.calibration.derived import Derived, derived_tensors
from qconvert.calibration.subgraphs import expose_body_tensors
from qconvert.dataset import Sample
from qconvert.errors import ModelLoadError
from qconvert.graph_utils import HOLDERS, body_nodes
from qconvert.runtime import describe_error, make_session

logger = logging.getLogger("qconvert")

_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE}
_INVOLVED_OPS = set(ops.QUANTIZED) | ops.PASS_THROUGH | ops.CLAMPS


@dataclass(frozen=True, slots=True, kw_only=True)
class SerializedModel:
    """A model as bytes, with the little `collect_statistics` needs to expose its tensors.

    What calibration workers get: adding graph outputs to the parsed protobuf costs a
    fraction of a round trip through onnx_ir, and every worker pays it before its first
    sample.

    Attributes:
        data: the serialized model.
        inputs: the names of its graph inputs.
        outputs: the names of its graph outputs.
        dtypes: the element type (an onnx TensorProto type) of each tensor to calibrate.
    """

    data: bytes
    inputs: frozenset[str]
    outputs: frozenset[str]
    dtypes: Mapping[str, int]

    @classmethod
    def of(cls, model: ir.Model, tensor_names: Iterable[str]) -> SerializedModel:
        """`model` serialized, ready to expose any of `tensor_names`."""
        dtypes = _dtypes(model)
        return cls(
            data=ir.serde.serialize_model(model).SerializeToString(),
            inputs=frozenset(value.name for value in model.graph.inputs),
            outputs=frozenset(value.name for value in model.graph.outputs),
            dtypes={name: dtypes.get(name, int(ir.DataType.FLOAT)) for name in tensor_names},
        )


def tensors_to_calibrate(model: ir.Model) -> tuple[str, ...]:
    """Names of the float activations that any scheme might quantize.

    These are the non-constant inputs and outputs of every node whose op type the policy
    table knows, in the main graph and in the bodies of its If/Loop/Scan nodes (passed out
    of their holder when exposed, see `subgraphs`). Calibrating all of them once lets one
    calibration serve every scheme and every exclusion.
    """
    names: dict[str, None] = {}
    nodes = list(model.graph)
    for holder in model.graph:
        if holder.op_type in HOLDERS:
            nodes += body_nodes(holder)
    for node in nodes:
        if node.op_type not in _INVOLVED_OPS:
            continue
        for value in (*node.inputs, *node.outputs):
            if value is None or not value.name or value.const_value is not None:
                continue
            if value.dtype is not None and value.dtype not in _FLOAT_TYPES:
                continue
            names[value.name] = None
    return tuple(names)


def checked_body_tensors(
    model: ir.Model, tensor_names: Iterable[str], sample: Sample
) -> tuple[str, ...]:
    """`tensor_names`, less those inside If/Loop/Scan bodies if they cannot be passed out.

    A Loop body tensor whose shape changes from one iteration to the next cannot be
    stacked over the iterations; onnxruntime then refuses the run. One run on `sample`
    tells; without the body tensors the nodes there stay float, and a warning says so.
    """
    names = tuple(tensor_names)
    main = {value.name for value in model.graph.inputs}
    main.update(value.name for node in model.graph for value in node.outputs)
    inside = tuple(name for name in names if name not in main)
    if not inside:
        return names
    try:
        session = make_session(
            exposed_model(model, inside), threads=1, optimize=False, quiet=True
        )
        session.run(list(inside), sample.feeds)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class
        logger.warning(
            "The tensors inside If/Loop/Scan bodies cannot be passed out for calibration "
            "(%s); the nodes there stay float.",
            describe_error(exc),
        )
        return tuple(name for name in names if name in main)
    return names


@dataclass(frozen=True, slots=True, kw_only=True)
class CalibrationGraph:
    """The calibration graph of a model, and what its session and reader need with it.

    Attributes:
        graph: the graph, its reductions and its outputs (`reducing`).
        weights: the model's large weights, handed to onnxruntime as arrays rather than
            inside the graph's bytes (`handed_weights`).
        derived: the tensors not read, whose statistics follow from another's.
        sizes: the sizes of `graph.reduced` on the shapes it was built for, as shape
            inference tells them; None if it cannot tell them all.
        outputs: the model's own outputs, for `KeptOutputs` (none if any is not a tensor:
            a sequence comes back as a list).
    """

    graph: reducing.ReducingGraph
    weights: dict[str, np.ndarray]
    derived: Mapping[str, Derived]
    sizes: np.ndarray | None
    outputs: tuple[str, ...]


def calibration_graph(
    model: ir.Model | SerializedModel,
    tensors: tuple[str, ...],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    histogram: bool,
) -> CalibrationGraph | None:
    """The graph that reduces `tensors` of `model` inside onnxruntime, for runs on `shapes`.

    Which tensors leave a run whole is read from their sizes in a run on these shapes; it
    changes no value (`reducing`), so workers that start on other shapes still compute the
    same statistics. None below `reducing.MIN_OPSET`: the tensors then run raw.
    """
    # The weights go to onnxruntime as arrays, not inside the graph's bytes: see
    # `handed_weights`.
    proto, dtypes, weights = _detached_proto(model)
    if reducing.opset_of(proto) < reducing.MIN_OPSET:
        return None
    # The outputs a scorer compares (`KeptOutputs`): none kept if any is not a tensor
    # (a sequence comes back as a list).
    model_outputs = tuple(output.name for output in proto.graph.output)
    if not all(output.type.HasField("tensor_type") for output in proto.graph.output):
        model_outputs = ()
    # The tensors whose statistics follow from another's are not read (`derived`).
    derived = derived_tensors(proto, tensors, dtypes)
    read = tuple(name for name in tensors if name not in derived)
    sizes = reducing.run_sizes(proto, read, shapes)
    graph = reducing.reducing_graph(
        proto, read, dtypes, histogram=histogram, whole=reducing.whole_tensors(sizes)
    )
    inferred = None
    if all(name in sizes for name in graph.reduced):
        inferred = np.array([sizes[name] for name in graph.reduced], np.int64)
    return CalibrationGraph(
        graph=graph, weights=weights, derived=derived, sizes=inferred, outputs=model_outputs
    )


def model_interface(
    model: ir.Model | SerializedModel,
) -> tuple[frozenset[str], frozenset[str]]:
    """The names of the model's graph inputs and graph outputs."""
    if isinstance(model, SerializedModel):
        return model.inputs, model.outputs
    return (
        frozenset(value.name for value in model.graph.inputs),
        frozenset(value.name for value in model.graph.outputs),
    )


def _dtypes(model: ir.Model) -> dict[str, int]:
    """The element type of every graph input and node output (FLOAT where unknown)."""
    values = (*model.graph.inputs, *(out for node in model.graph for out in node.outputs))
    return {value.name: int(value.dtype or ir.DataType.FLOAT) for value in values}


def open_session(
    model: bytes,
    threads: int,
    optimize: bool,
    *,
    ordered: bool = False,
    weights: Mapping[str, np.ndarray] | None = None,
):
    """A session on `model`'s bytes, quiet, with `weights` handed to it as arrays.

    Raises:
        ModelLoadError: onnxruntime cannot load it.
    """
    try:
        # Quiet: a reduction onnxruntime refuses is handled by a raw run of the batch.
        # Ordered: in onnxruntime's default order the calibration graph's reductions ran
        # late and kept every activation alive (a run of a 224x224 inverted-residual CNN took
        # 105 MB over its session, against 31 MB in priority order and 7 MB for a float
        # pass).
        # No memory pattern: a session plans one block for a run's tensors only after its
        # first run on a shape, which takes them one by one over the arena's first
        # regions; every later run's block then needs a region of its own beside them (on
        # a 320x320 text detector, a 17-23 MB block in a 32 MB region: one run held 46-57
        # MB of arena, 37 MB without the pattern, the same values), and with concurrent
        # runs a second block lands wherever the two runs' interleaving leaves room.
        return make_session(
            model,
            threads=threads,
            optimize=optimize,
            quiet=True,
            priority_order=ordered,
            memory_pattern=False,
            weights=weights,
        )
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class
        raise ModelLoadError(
            f"onnxruntime cannot load the model: {describe_error(exc)}"
        ) from None


def _proto(model: ir.Model | SerializedModel) -> tuple[onnx.ModelProto, Mapping[str, int]]:
    """The model as a protobuf of its own, and the element type of each value."""
    if isinstance(model, SerializedModel):
        return onnx.ModelProto.FromString(model.data), model.dtypes
    return ir.serde.serialize_model(model), _dtypes(model)


def _detached_proto(
    model: ir.Model | SerializedModel,
) -> tuple[onnx.ModelProto, Mapping[str, int], dict[str, np.ndarray]]:
    """`_proto` with the large weights out of the protobuf, as arrays (`handed_weights`).

    An onnx_ir model is serialized without them, never holding them in the protobuf.
    """
    if isinstance(model, SerializedModel):
        proto, dtypes = _proto(model)
        return proto, dtypes, handed_weights.detach(proto)
    proto, weights = handed_weights.serialize_detached(model)
    return proto, _dtypes(model), weights


def exposed_model(model: ir.Model | SerializedModel, tensor_names: tuple[str, ...]) -> bytes:
    """The model's bytes with `tensor_names` added as graph outputs."""
    proto, dtypes = _proto(model)
    expose_body_tensors(proto, tensor_names)
    existing = {output.name for output in proto.graph.output}
    for name in tensor_names:
        if name not in existing:
            # An output needs only its name and element type; onnxruntime infers the shape.
            dtype = dtypes.get(name, int(ir.DataType.FLOAT))
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, dtype, None))
    return proto.SerializeToString()
