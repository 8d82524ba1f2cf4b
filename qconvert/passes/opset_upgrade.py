"""The ai.onnx opset raised with the ONNX version converter, and its refusals made plain.

Preparation's step 2 (`passes/prepare.py`): per-axis DequantizeLinear needs opset 13, and a
model spelling HardSwish out in four ops is raised to 14. The converter works on protobuf:
large initializers travel as stripped references (`STRIPPED_PAYLOAD_BYTES`) and come back
shared, and a step it cannot take is named with the op that stopped it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import onnx
import onnx.version_converter
import onnx_ir as ir

from qconvert.errors import UnsupportedModelError


class UpgradeOpsetPass(ir.passes.FunctionalPass):
    """Raises the model's ai.onnx opset to at least `min_opset` with the ONNX converter.

    The converter works on protobuf, so an upgraded model is a new object. A model that
    imports no ai.onnx opset (only ai.onnx.ml ops, say) has nothing to convert: it gets the
    import, for the nodes the rewrite adds.
    """

    def __init__(self, *, min_opset: int) -> None:
        super().__init__()
        self.min_opset = min_opset

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if "" not in model.opset_imports and "ai.onnx" not in model.opset_imports:
            imported = model.clone()
            imported.opset_imports[""] = self.min_opset
            return ir.passes.PassResult(imported, modified=True)
        current = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        if current >= self.min_opset:
            return ir.passes.PassResult(model.clone(), modified=False)
        proto, stripped = _serialize_without_payloads(model)
        try:
            upgraded = onnx.version_converter.convert_version(proto, self.min_opset)
        except Exception:  # noqa: BLE001 - the converter raises errors of many kinds
            raise _upgrade_error(proto, current, self.min_opset) from None
        if upgraded.ir_version < _IR_OVERRIDABLE_INITIALIZERS:
            _drop_initializer_inputs(upgraded)
        _check_same_inputs(proto, upgraded, current, self.min_opset)
        result = ir.serde.deserialize_model(upgraded)
        for name, tensor in stripped.items():  # shared with `model` (never written)
            value = result.graph.initializers.get(name)
            if value is not None:
                value.const_value = tensor
        # weights kept in external data come back as bare references: they are read from
        # the folder the model's were
        folders = {
            value.const_value.base_dir
            for value in model.graph.initializers.values()
            if isinstance(value.const_value, ir.ExternalTensor)
        }
        if len(folders) == 1:
            ir.external_data.set_base_dir(result.graph, folders.pop())
        return ir.passes.PassResult(result, modified=True)


STRIPPED_PAYLOAD_BYTES = 4096
"""Initializers past this size go through the opset converter without their values."""


def _serialize_without_payloads(
    model: ir.Model,
) -> tuple[onnx.ModelProto, dict[str, ir.TensorProtocol]]:
    """The model's proto with its large initializers as bare references, and those tensors.

    The converter's adapters read attributes and small constant inputs (shapes, axes, scales),
    never a weight's values, yet it copies every byte in and out of its own IR: 5 of a 6-layer
    sentence encoder's 12.8 s of `quantize --scheme int4` went there, and 0.4 s more to
    serialize the weights and clear them again. Each large tensor is swapped for an
    external-data reference of its type and shape while the model is serialized (then put back:
    the pass leaves its input as it was); the upgraded model gets the tensors back by name.
    """
    stripped = {
        name: value.const_value
        for name, value in model.graph.initializers.items()
        if value.const_value is not None
        and not isinstance(value.const_value, ir.ExternalTensor)
        and value.const_value.nbytes > STRIPPED_PAYLOAD_BYTES
    }
    initializers = model.graph.initializers
    try:
        for name, tensor in stripped.items():
            initializers[name].const_value = ir.ExternalTensor(
                _STRIPPED_LOCATION, 0, 0, tensor.dtype, shape=tensor.shape, name=name
            )
        proto = ir.serde.serialize_model(model)
    finally:
        for name, tensor in stripped.items():
            initializers[name].const_value = tensor
    return proto, stripped


_STRIPPED_LOCATION = "qconvert-stripped-payload"
"""The location the stand-in references name; nothing reads it."""


def _check_same_inputs(
    before: onnx.ModelProto, after: onnx.ModelProto, current: int, target: int
) -> None:
    """Refuses an upgrade that changed what the model takes (Scan 8 -> 9 drops a batch axis).

    The data a user has fits the model as written; a converted model that wants other
    ranks or types would be verified, calibrated and compared on nothing it can take.
    """
    after_inputs = {value.name: value.type for value in after.graph.input}
    for value in before.graph.input:
        new = after_inputs.get(value.name)
        if new is None:
            continue  # an initializer the upgrade took off the input list
        old_tensor, new_tensor = value.type.tensor_type, new.tensor_type
        changed = value.type.WhichOneof("value") != new.WhichOneof("value")
        changed = changed or old_tensor.elem_type != new_tensor.elem_type
        if old_tensor.HasField("shape") and new_tensor.HasField("shape"):
            changed = changed or len(old_tensor.shape.dim) != len(new_tensor.shape.dim)
        if changed:
            raise UnsupportedModelError(
                f"The model's opset {current} cannot be upgraded to {target}: the ONNX "
                f"version converter changes the type or rank of input '{value.name}', so "
                "the model would no longer take its data.",
                hint="export the model again at a newer opset.",
            )


_IR_OVERRIDABLE_INITIALIZERS = 4
"""From IR version 4 an initializer listed as a graph input is a default the caller may
override; before it every initializer had to be listed, and all were weights."""


def _drop_initializer_inputs(proto: onnx.ModelProto) -> None:
    """Takes the weights of an IR 3 model off its input list, at the IR its opset needs.

    Left there, they would read as inputs a caller may feed: not constants to fold into a
    Conv or to quantize as weights.
    """
    weights = {tensor.name for tensor in proto.graph.initializer}
    inputs = [value for value in proto.graph.input if value.name not in weights]
    del proto.graph.input[:]
    proto.graph.input.extend(inputs)
    proto.ir_version = max(
        _IR_OVERRIDABLE_INITIALIZERS, onnx.helper.find_min_ir_version_for(proto.opset_import)
    )


def _upgrade_error(proto: onnx.ModelProto, current: int, target: int) -> UnsupportedModelError:
    """The refusal for a failed upgrade, naming the op and the one-opset step that failed.

    The converter's own words rarely name either (an assertion in an adapter), so the
    upgrade is retried one opset at a time, only now that it failed, to find the step.
    """
    step, words = current, "unknown failure"
    for version in range(current, target):
        try:
            proto = onnx.version_converter.convert_version(proto, version + 1)
        except Exception as exc:  # noqa: BLE001 - as above
            step, words = version, _converter_words(exc)
            break
    op = _op_at_step(proto, step, words)
    hint = "export the model again at a newer opset."
    if "is a param" in words:
        # The broadcast adapters of opset 7 read every dim as a number.
        hint = "fix the dynamic input dims with --input-shape NAME:DIMS, or " + hint
    return UnsupportedModelError(
        f"The model's opset {current} cannot be upgraded to {target}: the ONNX version "
        f"converter fails on {op} at the step from opset {step} to {step + 1} ({words}).",
        hint=hint,
    )


def _converter_words(exc: BaseException) -> str:
    """The converter's message without its source location and assertion text."""
    text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    return text.split(" failed: ", 1)[-1].strip()


def _op_at_step(proto: onnx.ModelProto, version: int, words: str) -> str:
    """The op the failed step from `version` most likely broke on, as '<op>' text.

    An op type of the model the converter's words name; else one whose schema changes at
    that step; else one without a schema at the next opset.
    """
    op_types = sorted({node.op_type for node in _all_nodes(proto.graph) if not node.domain})
    named = [op for op in op_types if re.search(rf"\b{op}\b", words)]
    if named:
        return f"'{named[0]}'"
    changed, unknown = [], []
    for op in op_types:
        try:
            schema = onnx.defs.get_schema(op, version + 1, "")
        except onnx.defs.SchemaError:
            unknown.append(op)
            continue
        if schema.since_version == version + 1:
            changed.append(op)
    if changed and "Shape of input" in words:
        # The adapter needed an input shape inference could not give: the changed ops
        # that read a value of unknown shape.
        unshaped = _ops_reading_unshaped_values(proto)
        changed = [op for op in changed if op in unshaped] or changed
    found = changed or unknown
    return ", ".join(f"'{op}'" for op in found) if found else "an op"


def _ops_reading_unshaped_values(proto: onnx.ModelProto) -> set[str]:
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - inference of a model the converter rejects may fail
        return set()
    graph = inferred.graph
    shaped = {t.name for t in graph.initializer}
    shaped |= {
        v.name
        for v in (*graph.input, *graph.value_info, *graph.output)
        if v.type.tensor_type.HasField("shape")
    }
    return {
        node.op_type
        for node in graph.node
        if any(name and name not in shaped for name in node.input)
    }


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _all_nodes(subgraph)
