"""Models whose weights live in external data, up to past protobuf's 2 GB limit, are written
with their tensors in `<output>.data` beside the output, atomically."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import sha256

import qconvert
from qconvert import QuantizeConfig, testing
from qconvert.runtime import make_session


def _external_locations(path) -> set[str]:
    model = onnx.load_model(str(path), load_external_data=False)
    return {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }


@pytest.fixture
def external_cnn(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    model = testing.conv_bn_relu(channels=16)
    path = testing.save_with_external_data(model, folder / "model.onnx")
    testing.write_samples(
        tmp_path / "calib", [testing.random_inputs(model, seed=i) for i in range(16)]
    )
    return path


@pytest.mark.parametrize("scheme", ["int8", "16x8", "int8-dynamic", "fp16", "fp16-weights"])
def test_external_data_model_is_saved_with_data_beside_the_output(
    external_cnn, tmp_path, scheme
):
    out_folder = tmp_path / "out"
    out_folder.mkdir()
    out = out_folder / "q.onnx"
    qconvert.quantize(
        external_cnn, out, data=tmp_path / "calib", config=QuantizeConfig(scheme=scheme)
    )
    assert _external_locations(out) == {"q.onnx.data"}
    assert sorted(p.name for p in out_folder.iterdir()) == ["q.onnx", "q.onnx.data"]
    feeds = [
        testing.random_inputs(testing.conv_bn_relu(channels=16), seed=50 + i) for i in range(4)
    ]
    bound = 25.0 if scheme in ("int8", "int8-dynamic") else 35.0
    assert testing.output_sqnr(external_cnn, out, feeds) >= bound
    # The input is untouched: its own data file is still the only one it names.
    assert _external_locations(external_cnn) == {"model.onnx.data"}


def test_external_data_output_is_byte_identical_across_runs(external_cnn, tmp_path):
    hashes = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        out = folder / "q.onnx"
        qconvert.quantize(external_cnn, out, data=tmp_path / "calib")
        hashes.append((sha256(out), sha256(folder / "q.onnx.data")))
    assert hashes[0] == hashes[1]


def test_failed_verification_leaves_neither_file(external_cnn, tmp_path, monkeypatch):
    from qconvert.errors import VerificationError
    from qconvert.pipelines import verify_save

    def failing(model, feeds, *, nonfinite_in_float=frozenset(), plan=None):
        raise VerificationError("refused for the test")

    monkeypatch.setattr(verify_save, "verify_model", failing)
    out = tmp_path / "q.onnx"
    with pytest.raises(VerificationError):
        qconvert.quantize(external_cnn, out, data=tmp_path / "calib")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib", "model"]


def _spy_kept_external(monkeypatch) -> list[bool]:
    """Records, per model loaded, whether its weights stayed in external data."""
    from qconvert import model as model_io

    kept: list[bool] = []
    load = model_io.load_model

    def spy(*args, **kwargs):
        model = load(*args, **kwargs)
        values = model.graph.initializers.values()
        kept.append(any(isinstance(v.const_value, ir.ExternalTensor) for v in values))
        return model

    monkeypatch.setattr(model_io, "load_model", spy)
    return kept


@pytest.mark.parametrize(
    ("scheme", "recipe"),
    [("int8", "fast"), ("int8", "default"), ("16x8", "fast"), ("fp16", "fast")],
)
def test_static_scheme_past_the_inline_limit_calibrates_from_references(
    external_cnn, tmp_path, monkeypatch, scheme, recipe
):
    # With the limit lowered below this model's weights, it takes the path a > 2 GB model
    # takes: its weights stay in its data file, and every session onnxruntime makes from
    # the model's bytes (calibration, the recipe's scoring, AdaRound, bias correction,
    # fp16's range pass) maps them from there. The model written is the one the in-memory
    # path writes.
    from qconvert import model as model_io

    hashes = {}
    for name, limit in (("inline", model_io.INLINE_WEIGHTS_LIMIT), ("kept", 1000)):
        monkeypatch.setattr(model_io, "INLINE_WEIGHTS_LIMIT", limit)
        kept = _spy_kept_external(monkeypatch)
        folder = tmp_path / name
        folder.mkdir()
        out = folder / "q.onnx"
        qconvert.quantize(
            external_cnn,
            out,
            data=tmp_path / "calib",
            recipe=recipe,
            config=QuantizeConfig(scheme=scheme),
        )
        monkeypatch.undo()
        assert kept[0] is (name == "kept")
        hashes[name] = (sha256(out), sha256(folder / "q.onnx.data"))
    assert hashes["kept"] == hashes["inline"]


@pytest.mark.parametrize("workers", [1, 2])
def test_calibrate_past_the_inline_limit_gives_the_same_statistics(
    external_cnn, tmp_path, monkeypatch, workers
):
    from qconvert import model as model_io

    inline = qconvert.calibrate(external_cnn, tmp_path / "calib", workers=workers)
    monkeypatch.setattr(model_io, "INLINE_WEIGHTS_LIMIT", 1000)
    kept = _spy_kept_external(monkeypatch)
    out = tmp_path / "c.json"
    calibration = qconvert.calibrate(
        external_cnn, tmp_path / "calib", output=out, workers=workers
    )
    assert kept == [True]
    assert calibration.to_json() == inline.to_json()
    assert out.read_text() == inline.to_json()


# 3 weights of 14000 x 14000 float32: 2.35 GB, past protobuf's 2 GB (2^31 - 1) limit.
_SIDE, _LAYERS = 14_000, 3
_NEEDED_DISK = 8 * 2**30  # input 2.35 GB + int8 output 0.6 GB, staged once, with margin


def _write_big_model(path):
    rng = np.random.default_rng(0)
    current = ir.Value(
        name="input", shape=ir.Shape([1, _SIDE]), type=ir.TensorType(ir.DataType.FLOAT)
    )
    inputs, nodes, initializers = [current], [], []
    # One array written three times, made of a random block tiled down the rows:
    # generating 196 M normals would be the slowest part of the test.
    block = rng.standard_normal((_SIDE // 14, _SIDE), dtype=np.float32)
    weight = np.tile(block * np.float32(1.0 / np.sqrt(_SIDE)), (14, 1))  # unit-scale outputs
    for index in range(_LAYERS):
        value = ir.Value(
            name=f"w{index}",
            shape=ir.Shape(weight.shape),
            type=ir.TensorType(ir.DataType.FLOAT),
            const_value=ir.tensor(weight, name=f"w{index}"),
        )
        initializers.append(value)
        node = ir.node("MatMul", [current, value], name=f"mm{index}")
        node.outputs[0].name = f"h{index}"
        nodes.append(node)
        current = node.outputs[0]
    current.shape = ir.Shape([1, _SIDE])
    current.type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph(
        inputs,
        [current],
        nodes=nodes,
        initializers=initializers,
        opset_imports={"": 17},
        name="big",
    )
    ir.save(ir.Model(graph, ir_version=8), path, external_data=f"{path.name}.data")


@pytest.mark.slow
def test_model_over_2gb_quantizes_and_saves_with_external_data(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    if free < _NEEDED_DISK:
        pytest.skip(f"needs {_NEEDED_DISK / 2**30:.0f} GiB free disk, {free / 2**30:.1f} here")
    source = tmp_path / "big.onnx"
    _write_big_model(source)
    assert (tmp_path / "big.onnx.data").stat().st_size > 2**31
    out_folder = tmp_path / "out"
    out_folder.mkdir()
    out = out_folder / "big.int8.onnx"
    report = qconvert.quantize(source, out, config=QuantizeConfig(scheme="int8-dynamic"))
    assert report.conversion.quantized_ops == {"MatMul": _LAYERS}
    assert _external_locations(out) == {"big.int8.onnx.data"}
    data_size = (out_folder / "big.int8.onnx.data").stat().st_size
    assert data_size >= _LAYERS * _SIDE * _SIDE  # one byte a weight
    assert report.conversion.size_ratio < 0.27
    feeds = {"input": np.random.default_rng(1).standard_normal((1, _SIDE), dtype=np.float32)}
    (expected,) = make_session(str(source)).run(None, feeds)
    (actual,) = make_session(str(out)).run(None, feeds)
    sqnr = 10 * np.log10(np.sum(expected**2) / np.sum((expected - actual) ** 2))
    assert sqnr >= 20.0, f"SQNR {sqnr:.1f} dB"
