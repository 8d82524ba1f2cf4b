"""Large weights handed to onnxruntime as arrays (`qconvert/handed_weights.py`).

The session must compute what the session on the whole model computes, bit for bit, and
calibration must give the same statistics either way.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from qconvert import handed_weights, testing
from qconvert import model as model_io
from qconvert.calibration import CollectSettings, collect_statistics
from qconvert.calibration.graphs import tensors_to_calibrate
from qconvert.dataset import Sample
from qconvert.passes import prepare
from qconvert.runtime import external_weights, make_session


def _large_mlp() -> onnx.ModelProto:
    # w: 256 x 128 float32 = 128 KiB, over `MIN_BYTES`; b: 512 bytes, under it.
    return testing.matmul_add(k=256, n=128)


def test_detach_moves_only_large_weights_and_the_session_computes_the_same():
    proto = _large_mlp()
    whole = make_session(proto.SerializeToString(), threads=1)
    stripped = onnx.ModelProto()
    stripped.CopyFrom(proto)
    weights = handed_weights.detach(stripped)

    assert sorted(weights) == ["w"]
    np.testing.assert_array_equal(
        weights["w"], onnx.numpy_helper.to_array(proto.graph.initializer[0])
    )
    size = len(stripped.SerializeToString())
    assert size < 4096 < len(proto.SerializeToString()), size
    handed = make_session(stripped.SerializeToString(), threads=1, weights=weights)
    del weights  # onnxruntime copied them: the session must not need the arrays
    for seed in range(3):
        feeds = testing.random_inputs(proto, batch=2, seed=seed)
        np.testing.assert_array_equal(handed.run(None, feeds)[0], whole.run(None, feeds)[0])


def test_an_onnx_ir_model_serializes_detached_without_a_copy_and_is_left_as_it_was():
    model = ir.serde.deserialize_model(_large_mlp())
    model.graph.initializers["w"].const_value = ir.tensor(  # an array, as passes make
        model.graph.initializers["w"].const_value.numpy().copy(), name="w"
    )
    before = ir.serde.serialize_model(model).SerializeToString()
    expected = ir.serde.serialize_model(model)
    expected_weights = handed_weights.detach(expected)

    proto, weights = handed_weights.serialize_detached(model)

    # The same protobuf, bytes for bytes, and the same arrays as serializing then detaching.
    assert proto.SerializeToString() == expected.SerializeToString()
    assert sorted(weights) == sorted(expected_weights) == ["w"]
    np.testing.assert_array_equal(weights["w"], expected_weights["w"])
    # The array is the model's own, not a copy; and the model is as it was.
    assert np.shares_memory(weights["w"], model.graph.initializers["w"].const_value.numpy())
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_weights_listed_as_inputs_stay_in_the_model():
    proto = _large_mlp()
    weight = proto.graph.initializer[0]
    proto.graph.input.append(
        onnx.helper.make_tensor_value_info(weight.name, weight.data_type, weight.dims)
    )
    assert handed_weights.detach(proto) == {}
    assert proto.graph.initializer[0].raw_data


def test_calibration_statistics_are_the_same_with_handed_weights(tmp_path, monkeypatch):
    proto = _large_mlp()
    path = testing.save(proto, tmp_path / "m.onnx")
    model = prepare(model_io.load_model(path), min_opset=1)
    names = tensors_to_calibrate(model)
    samples = [Sample(f"s{i}", testing.random_inputs(proto, seed=i)) for i in range(6)]
    settings = CollectSettings(histogram_values=10**9)
    serialize, moved = handed_weights.serialize_detached, []

    def spy(model, **kwargs):
        proto, weights = serialize(model, **kwargs)
        moved.append(sorted(weights))
        return proto, weights

    monkeypatch.setattr(handed_weights, "serialize_detached", spy)
    # As `calibrate` runs it: sessions told where a model's external data files are.
    with external_weights(tmp_path):
        handed = collect_statistics(model, samples, names, settings=settings)
        monkeypatch.setattr(handed_weights, "MIN_BYTES", 1 << 40)  # nothing is handed over
        inside = collect_statistics(model, samples, names, settings=settings)

    assert moved == [["w"], []]

    assert set(handed) == set(inside) == set(names)
    for name in names:
        a, b = handed[name], inside[name]
        assert (a.min, a.max, a.count, a.exponent, a.first_bin) == (
            b.min,
            b.max,
            b.count,
            b.exponent,
            b.first_bin,
        ), name
        np.testing.assert_array_equal(a.bins, b.bins, err_msg=name)


def test_an_onnx_ir_model_keeps_weights_listed_as_inputs():
    proto = _large_mlp()
    weight = proto.graph.initializer[0]
    proto.graph.input.append(
        onnx.helper.make_tensor_value_info(weight.name, weight.data_type, weight.dims)
    )
    serialized, weights = handed_weights.serialize_detached(ir.serde.deserialize_model(proto))
    assert weights == {}
    assert serialized.graph.initializer[0].raw_data == weight.raw_data


def test_a_model_serialized_with_its_weights_beside_it_computes_the_same():
    # The recipe's and the range check's scoring sessions are built this way.
    proto = _large_mlp()
    model = ir.serde.deserialize_model(proto)
    graph, weights = handed_weights.serialized(model)
    assert sorted(weights) == ["w"]
    assert len(graph) < 4096 < len(model_io.to_bytes(model)), len(graph)
    feeds = testing.random_inputs(proto, batch=3, seed=3)
    whole = make_session(model_io.to_bytes(model), threads=1).run(None, feeds)
    handed = make_session(graph, threads=1, weights=weights).run(None, feeds)
    for a, b in zip(whole, handed, strict=True):
        np.testing.assert_array_equal(a, b)


def _with_unused_weight(proto: onnx.ModelProto) -> onnx.ModelProto:
    """`proto` with a 128 KiB initializer no node reads, as a fold or an exporter leaves."""
    unused = np.ones((256, 128), np.float32)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(unused, "dead_weight"))
    return proto


def test_an_initializer_nothing_reads_is_not_handed_over():
    # onnxruntime drops an unread initializer before it takes the handed arrays, then
    # fails on the name it dropped ("Failed to find existing initializer").
    proto = _with_unused_weight(_large_mlp())
    whole = make_session(proto.SerializeToString(), threads=1)

    weights = handed_weights.detach(proto)
    assert sorted(weights) == ["w"]
    handed = make_session(proto.SerializeToString(), threads=1, weights=weights)

    model = ir.serde.deserialize_model(_with_unused_weight(_large_mlp()))
    detached, ir_weights = handed_weights.serialize_detached(model)
    assert sorted(ir_weights) == ["w"]
    from_ir = make_session(detached.SerializeToString(), threads=1, weights=ir_weights)
    feeds = testing.random_inputs(_large_mlp(), batch=2, seed=0)
    expected = whole.run(None, feeds)[0]
    np.testing.assert_array_equal(handed.run(None, feeds)[0], expected)
    np.testing.assert_array_equal(from_ir.run(None, feeds)[0], expected)


def test_a_gate_whose_weight_preparation_replaces_quantizes(tmp_path):
    # Preparation folds the HardSigmoid's affine into the excite Conv and leaves the old,
    # now unread weight (128 KiB at 256 channels, over `MIN_BYTES`) in the graph:
    # calibration's session failed on it.
    rng = np.random.default_rng(3)
    samples = [
        {"input": rng.standard_normal((1, 16, 12, 24)).astype(np.float32)} for _ in range(8)
    ]
    model = testing.squeeze_excitation(256, squeeze=4)
    path, out, _, _ = testing.quantize_fast(model, tmp_path, "se", samples)
    assert testing.output_sqnr(path, out, samples) > 20.0
