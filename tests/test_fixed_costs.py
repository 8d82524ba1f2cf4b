"""The fixed costs cut from loading, calibrating and verifying keep every output the same.

- `model.load_model` parses the file once and hands that protobuf to onnx_ir: the model it
  returns is the one onnx_ir's own loader reads, external data included.
- `quantize --data` does not hash the model file (its statistics are never written);
  `calibrate`'s file still carries the file's SHA-256, hashed on a thread beside the load.
- Verification hands the checker the model's bytes, not a protobuf it would serialize
  again: a model the checker refuses is still refused, in the same words.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from qconvert import api, testing
from qconvert import model as model_io
from qconvert.errors import VerificationError
from qconvert.verify import verify_model


def _onnx_ir_bytes(path) -> bytes:
    """The model as onnx_ir's own loader reads it, its weights read into memory."""
    model = ir.external_data.load_to_model(ir.load(path))
    return ir.serde.serialize_model(model).SerializeToString()


def _with_constant_and_subgraph() -> onnx.ModelProto:
    """A Constant node's weight and an If whose branches read the main graph's values."""
    rng = np.random.default_rng(0)
    weight = helper.make_tensor(
        "w", onnx.TensorProto.FLOAT, [4, 4], rng.normal(size=16).astype(np.float32)
    )
    then_branch = helper.make_graph(
        [helper.make_node("Relu", ["y"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, [1, 4])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["y"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, [1, 4])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["w"], value=weight),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
            helper.make_node(
                "If", ["flag"], ["out"], then_branch=then_branch, else_branch=else_branch
            ),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("flag", onnx.TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize(
    "build", [testing.conv_bn_relu, _with_constant_and_subgraph], ids=["cnn", "subgraph"]
)
def test_load_model_reads_what_onnx_ir_reads(build, tmp_path):
    path = testing.save(build(), tmp_path / "model.onnx")
    loaded = ir.serde.serialize_model(model_io.load_model(path)).SerializeToString()
    assert loaded == _onnx_ir_bytes(path)


def test_load_model_reads_external_data_beside_the_file(tmp_path, monkeypatch):
    path = testing.save_with_external_data(testing.conv_bn_relu(), tmp_path / "m.onnx")
    expected = _onnx_ir_bytes(path)
    # From another working folder: the data file is found beside the model, not here.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = model_io.load_model(path)
    weights = [v.const_value.numpy() for v in loaded.graph.initializers.values()]
    assert sum(w.size for w in weights) > 0
    assert ir.serde.serialize_model(loaded).SerializeToString() == expected


def test_quantize_data_does_not_hash_the_model(tiny_cnn, tmp_path, monkeypatch):
    hashed = []
    original = model_io.fingerprint
    monkeypatch.setattr(model_io, "fingerprint", lambda p: hashed.append(p) or original(p))
    api.quantize(
        tiny_cnn, tmp_path / "fast.onnx", data=tiny_cnn.parent / "calib", recipe="fast"
    )
    assert hashed == []
    # `calibrate` still ties its file to the model's bytes.
    api.calibrate(tiny_cnn, tiny_cnn.parent / "calib", output=tmp_path / "c.json")
    written = json.loads((tmp_path / "c.json").read_text())
    assert written["model"]["sha256"] == hashlib.sha256(tiny_cnn.read_bytes()).hexdigest()
    assert len(hashed) == 1


def test_the_hash_started_ahead_is_the_files(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(range(256)) * 9000)  # a few 1 MB chunks, the last one short
    assert model_io.fingerprint_ahead(path)() == hashlib.sha256(path.read_bytes()).hexdigest()
    # A file that is not there: the error is raised where the digest is asked for.
    waiting = model_io.fingerprint_ahead(tmp_path / "missing.onnx")
    with pytest.raises(FileNotFoundError):
        waiting()


def test_quantize_data_and_calib_write_the_same_bytes(tiny_cnn, tmp_path):
    """The statistics quantize gathers unhashed are the file's: the same model comes out."""
    calib = tiny_cnn.parent / "calib"
    api.calibrate(tiny_cnn, calib, output=tmp_path / "c.json")
    api.quantize(tiny_cnn, tmp_path / "a.onnx", data=calib, recipe="fast", method="minmax")
    api.quantize(tiny_cnn, tmp_path / "b.onnx", calib=tmp_path / "c.json", method="minmax")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_verify_refuses_bytes_the_checker_refuses():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["missing"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
    )
    broken = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": np.zeros((1, 4), np.float32)}
    with pytest.raises(
        VerificationError, match=r"^The converted model fails the ONNX checker: "
    ):
        verify_model(broken.SerializeToString(), feeds, audit=False)


def test_verify_passes_bytes_the_checker_takes():
    model = testing.conv_bn_relu()
    feeds = testing.random_inputs(model)
    audit = verify_model(model.SerializeToString(), feeds)
    assert audit is not None


def _calibrate_counting_runs(model, calib, output, monkeypatch) -> int:
    """`calibrate` in this process; returns how many runs onnxruntime made."""
    import onnxruntime as ort

    runs = []
    original = ort.InferenceSession.run
    monkeypatch.setattr(
        ort.InferenceSession,
        "run",
        lambda self, *a, **k: runs.append(1) or original(self, *a, **k),
    )
    api.calibrate(model, calib, output=output, workers=1)
    monkeypatch.setattr(ort.InferenceSession, "run", original)
    return len(runs)


def _without_inferred_strides(monkeypatch) -> None:
    """The collector as it was: every new input signature's first run a size probe."""
    from qconvert.calibration import collect

    opened = collect._Runner._open

    def probing(self, feeds):
        opened(self, feeds)
        self.inferred.clear()

    monkeypatch.setattr(collect._Runner, "_open", probing)


def test_first_run_takes_the_inferred_strides(tmp_path, monkeypatch):
    # 128 channels of 8x8: 8,192 values a run, past `reducing.WHOLE_VALUES`, so the Conv's
    # output is reduced in the graph and its histogram subset takes a stride.
    model = testing.conv_bn_relu(128)
    path = testing.save(model, tmp_path / "m.onnx")
    samples = 12
    calib = testing.write_samples(
        tmp_path / "calib", [testing.random_inputs(model, seed=i) for i in range(samples)]
    )
    guessed = _calibrate_counting_runs(path, calib, tmp_path / "a.json", monkeypatch)
    _without_inferred_strides(monkeypatch)
    probed = _calibrate_counting_runs(path, calib, tmp_path / "b.json", monkeypatch)
    assert (guessed, probed) == (samples, samples + 1)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def _data_dependent_sizes() -> onnx.ModelProto:
    """A Tile whose repeats come from the data: shape inference cannot size its output."""
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("ReduceMax", ["r"], ["m"], keepdims=0),
            helper.make_node("Ceil", ["m"], ["c"]),
            helper.make_node("Cast", ["c"], ["n"], to=onnx.TensorProto.INT64),
            helper.make_node("Add", ["n", "one"], ["n1"]),
            helper.make_node("Reshape", ["n1", "one"], ["reps"]),
            helper.make_node("Reshape", ["r", "flat"], ["rf"]),
            helper.make_node("Tile", ["rf", "reps"], ["t"]),
            helper.make_node("Sigmoid", ["t"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2048])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n"])],
        [
            helper.make_tensor("one", onnx.TensorProto.INT64, [1], [1]),
            helper.make_tensor("flat", onnx.TensorProto.INT64, [1], [-1]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_sizes_from_the_data_still_probe(tmp_path, monkeypatch):
    model = _data_dependent_sizes()
    path = testing.save(model, tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    calib = testing.write_samples(
        tmp_path / "calib",
        [{"x": (rng.normal(size=(1, 2048)) * (i + 1)).astype(np.float32)} for i in range(6)],
    )
    api.calibrate(path, calib, output=tmp_path / "a.json", workers=1)
    _without_inferred_strides(monkeypatch)
    api.calibrate(path, calib, output=tmp_path / "b.json", workers=1)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert "t" in json.loads((tmp_path / "a.json").read_text())["tensors"]
