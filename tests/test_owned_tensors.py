"""Loaded models own their tensors' bytes (`qconvert/owned_tensors.py`).

A loaded weight is read without a copy, every kind of tensor is written back as it was
read, and what `quantize` writes is the same, byte for byte, as from the parsed file.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from qconvert import model as model_io
from qconvert import owned_tensors, testing
from qconvert.testing._build import random_weights


def _mixed_tensors() -> onnx.ModelProto:
    """y = (x @ w + b) * c + k: every kind of tensor `own_tensors` tells apart.

    w: plain raw bytes (an array); b: `float_data` (typed field); c: a Constant node's
    tensor attribute; k: raw bytes with a doc string (a field an array would drop).
    """
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(random_weights(rng, 64, 32), "w")
    b = helper.make_tensor("b", onnx.TensorProto.FLOAT, [32], rng.random(32).tolist())
    k = numpy_helper.from_array(random_weights(rng, 32), "k")
    k.doc_string = "an offset"
    c = numpy_helper.from_array(random_weights(rng, 32), "c_value")
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["c"], value=c),
            helper.make_node("MatMul", ["x", "w"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["xwb"]),
            helper.make_node("Mul", ["xwb", "c"], ["scaled"]),
            helper.make_node("Add", ["scaled", "k"], ["y"]),
        ],
        "mixed",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 32])],
        [w, b, k],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_loaded_weight_is_read_without_a_copy(tmp_path):
    path = testing.save(_mixed_tensors(), tmp_path / "model.onnx")
    parsed = ir.load(path)
    loaded = model_io.load_model(path)

    parsed_w = parsed.graph.initializers["w"].const_value
    loaded_w = loaded.graph.initializers["w"].const_value
    # The file's view copies its bytes out at every read; the loaded tensor is one array.
    assert not np.shares_memory(parsed_w.numpy(), parsed_w.numpy())
    assert np.shares_memory(loaded_w.numpy(), loaded_w.numpy())
    np.testing.assert_array_equal(loaded_w.numpy(), parsed_w.numpy())
    # The weights are read-only, as the file's view was: a pass replaces, never writes.
    with pytest.raises(ValueError, match="read-only"):
        loaded_w.numpy()[0, 0] = 1.0


def test_every_kind_of_tensor_is_written_back_as_it_was_read(tmp_path):
    path = testing.save(_mixed_tensors(), tmp_path / "model.onnx")
    parsed = ir.load(path)
    owned = ir.load(path)
    owned_tensors.own_tensors(owned)

    tensors = {name: v.const_value for name, v in owned.graph.initializers.items()}
    assert isinstance(tensors["w"], ir.Tensor)  # plain raw bytes: an array
    # float_data and a doc string: messages of their own, copied field for field
    assert isinstance(tensors["b"], ir.serde.TensorProtoTensor)
    assert isinstance(tensors["k"], ir.serde.TensorProtoTensor)
    assert tensors["k"].raw is not parsed.graph.initializers["k"].const_value.raw
    constant = next(node for node in owned.graph if node.op_type == "Constant")
    assert isinstance(constant.attributes["value"].value, ir.Tensor)
    assert (
        ir.serde.serialize_model(owned).SerializeToString()
        == ir.serde.serialize_model(parsed).SerializeToString()
    )


def test_quantize_writes_the_same_bytes_as_from_the_parsed_file(tmp_path, monkeypatch):
    model = testing.conv_bn_relu(channels=8)
    path = testing.save(model, tmp_path / "model.onnx")
    calib = testing.write_samples(
        tmp_path / "calib",
        [testing.random_inputs(model, batch=1, seed=seed) for seed in range(48)],
    )
    import qconvert

    qconvert.quantize(path, tmp_path / "owned.onnx", data=calib)
    monkeypatch.setattr(model_io, "own_tensors", lambda model: None)
    qconvert.quantize(path, tmp_path / "parsed.onnx", data=calib)

    written = (tmp_path / "owned.onnx").read_bytes()
    assert written == (tmp_path / "parsed.onnx").read_bytes()


def test_the_fields_a_tensor_holds_are_told_without_reading_its_bytes():
    model = _mixed_tensors()
    tensors = [*model.graph.initializer, model.graph.node[0].attribute[0].t]
    external = onnx.TensorProto(name="e", data_type=onnx.TensorProto.FLOAT, dims=[2])
    external.data_location = onnx.TensorProto.EXTERNAL
    external.external_data.add(key="location", value="weights.bin")
    for tensor in (*tensors, external, onnx.TensorProto()):
        listed = {field.name for field, _ in tensor.ListFields()}
        assert owned_tensors._present_fields(tensor) == listed
