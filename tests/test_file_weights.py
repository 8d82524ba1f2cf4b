"""The float model's weights that preparation replaced are read from its file when asked.

`file_weights.read_from_file` leaves the float model holding no array of them; every
read gives the file's values, the written model is the same bytes, and a file changed
underneath is a clear error.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import sha256

import qconvert
from qconvert import file_weights, testing
from qconvert import model as model_io
from qconvert.errors import ModelLoadError
from qconvert.passes import prepare
from qconvert.pipelines import quantize_stages
from qconvert.testing._build import checked_model, random_weights


def _wide_conv_bn() -> onnx.ModelProto:
    """Conv (128 x 16 x 3 x 3: 72 KiB, over `MIN_BYTES`) -> BatchNorm -> Relu -> Conv."""
    rng = np.random.default_rng(0)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        wide (float[N,16,8,8] input) => (float[N,8,8,8] out) {
            conv = Conv <pads = [1,1,1,1], kernel_shape = [3,3]> (input, w1, b1)
            bn = BatchNormalization (conv, scale, bias, mean, var)
            relu = Relu (bn)
            out = Conv <kernel_shape = [1,1]> (relu, w2, b2)
        }
    """
    return checked_model(
        text,
        {
            "w1": random_weights(rng, 128, 16, 3, 3),
            "b1": random_weights(rng, 128, scale=0.1),
            "scale": (1 + 0.2 * rng.standard_normal(128)).astype(np.float32),
            "bias": random_weights(rng, 128, scale=0.1),
            "mean": random_weights(rng, 128, scale=0.1),
            "var": (0.5 + rng.random(128)).astype(np.float32),
            "w2": random_weights(rng, 8, 128, 1, 1),
            "b2": random_weights(rng, 8, scale=0.1),
        },
    )


def test_spans_are_where_each_initializer_raw_data_lies(tmp_path):
    proto = _wide_conv_bn()
    path = testing.save(proto, tmp_path / "model.onnx")
    spans = file_weights.initializer_spans(path)
    data = path.read_bytes()

    assert sorted(spans) == sorted(t.name for t in proto.graph.initializer)
    for tensor in proto.graph.initializer:
        offset, length = spans[tensor.name]
        assert data[offset : offset + length] == tensor.raw_data


def test_replaced_weights_are_not_held_and_read_back_the_same(tmp_path):
    path = testing.save(_wide_conv_bn(), tmp_path / "model.onnx")
    model = model_io.load_model(path)
    before = model_io.to_bytes(model)
    prepared = prepare(model.clone(), min_opset=1)
    original = model.graph.initializers["w1"].const_value
    values = original.numpy().copy()
    held = weakref.ref(original.numpy())
    del original

    released = file_weights.read_from_file(model, path, prepared)
    gc.collect()

    assert released == values.nbytes  # w1 alone: w2 is small, the rest are vectors
    assert held() is None  # the array is gone; the tensor reads the file
    tensor = model.graph.initializers["w1"].const_value
    assert isinstance(tensor, ir.LazyTensor)
    np.testing.assert_array_equal(tensor.numpy(), values)
    assert model_io.to_bytes(model) == before


def test_a_weight_the_prepared_model_shares_stays_held(tmp_path):
    path = testing.save(_wide_conv_bn(), tmp_path / "model.onnx")
    model = model_io.load_model(path)
    # Only the model itself: its every tensor is "shared" with the prepared copy.
    assert file_weights.read_from_file(model, path, model) == 0
    assert type(model.graph.initializers["w1"].const_value) is ir.Tensor


def test_a_tensor_whose_bytes_differ_from_the_file_stays_held(tmp_path):
    path = testing.save(_wide_conv_bn(), tmp_path / "model.onnx")
    model = model_io.load_model(path)
    changed = model.graph.initializers["w1"].const_value.numpy() * 2
    model.graph.initializers["w1"].const_value = ir.Tensor(changed, name="w1")
    assert file_weights.read_from_file(model, path) == 0


def test_a_file_changed_after_is_a_clear_error(tmp_path):
    path = testing.save(_wide_conv_bn(), tmp_path / "model.onnx")
    model = model_io.load_model(path)
    file_weights.read_from_file(model, path)
    path.write_bytes(path.read_bytes() + b"\0")  # another save over it
    with pytest.raises(ModelLoadError, match="changed while"):
        model.graph.initializers["w1"].const_value.numpy()


def test_quantize_writes_the_same_bytes_with_the_weights_read_back(tmp_path, monkeypatch):
    proto = _wide_conv_bn()
    path = testing.save(proto, tmp_path / "model.onnx")
    testing.write_samples(
        tmp_path / "calib", [testing.random_inputs(proto, seed=i) for i in range(8)]
    )
    released = []
    real = quantize_stages.read_from_file
    monkeypatch.setattr(
        quantize_stages,
        "read_from_file",
        lambda *args: released.append(real(*args)) or released[-1],
    )
    qconvert.quantize(path, tmp_path / "read.onnx", data=tmp_path / "calib", recipe="fast")
    monkeypatch.setattr(quantize_stages, "read_from_file", lambda *args: 0)
    qconvert.quantize(path, tmp_path / "held.onnx", data=tmp_path / "calib", recipe="fast")

    assert released and released[0] > 0
    assert sha256(tmp_path / "read.onnx") == sha256(tmp_path / "held.onnx")
