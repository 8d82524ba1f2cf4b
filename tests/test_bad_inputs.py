"""Bad models and bad data: one line naming the cause, exit 3, no output, input untouched."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import sha256

from qconvert import testing


def _quantize(run_cli, model, data, out):
    return run_cli("quantize", model, "--data", data, "-o", out)


def _assert_clean_failure(result, out, *fragments):
    assert result.code == 3, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("Error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_missing_model_file(run_cli, tiny_cnn, tmp_path):
    out = tmp_path / "out.onnx"
    result = _quantize(run_cli, tmp_path / "nope.onnx", tmp_path / "calib", out)
    _assert_clean_failure(result, out, "nope.onnx", "does not exist")


def test_file_that_is_not_onnx(run_cli, tiny_cnn, tmp_path):
    bogus = tmp_path / "notes.onnx"
    bogus.write_text("these are not the weights you are looking for\n" * 20)
    out = tmp_path / "out.onnx"
    result = _quantize(run_cli, bogus, tmp_path / "calib", out)
    _assert_clean_failure(result, out, "notes.onnx")


def test_truncated_model_file(run_cli, tiny_cnn, tmp_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(tiny_cnn.read_bytes()[:700])
    out = tmp_path / "out.onnx"
    result = _quantize(run_cli, truncated, tmp_path / "calib", out)
    _assert_clean_failure(result, out, "truncated.onnx")


def test_model_that_fails_the_checker(run_cli, tiny_cnn, tmp_path):
    model = onnx.load_model(str(tiny_cnn))
    model.graph.node[0].input[1] = "no_such_tensor"  # a dangling input
    broken = tmp_path / "broken.onnx"
    onnx.save_model(model, str(broken))
    out = tmp_path / "out.onnx"
    result = _quantize(run_cli, broken, tmp_path / "calib", out)
    _assert_clean_failure(result, out, "broken.onnx", "fails the ONNX checker")


def test_existing_output_is_refused_without_force(run_cli, tiny_cnn, tmp_path):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"precious")
    result = _quantize(run_cli, tiny_cnn, tmp_path / "calib", out)
    assert result.code == 3
    assert "already exists" in result.err and "--force" in result.err
    assert out.read_bytes() == b"precious"


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_writing_over_the_input_model_is_refused_even_with_force(
    run_cli, tiny_cnn, tmp_path, scheme
):
    # The run reads its input again after writing (the comparison's float reference):
    # written over, the converted model would be compared with itself.
    before = sha256(tiny_cnn)
    result = run_cli(
        "quantize", tiny_cnn, "--scheme", scheme, "--data", tmp_path / "calib",
        "-o", tiny_cnn, "--force",
    )  # fmt: skip
    assert result.code == 3, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "is the input model" in lines[0], result.err
    assert "Traceback" not in result.err
    assert sha256(tiny_cnn) == before


def test_empty_data_folder(run_cli, tiny_cnn, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out.onnx"
    result = _quantize(run_cli, tiny_cnn, tmp_path / "empty", out)
    _assert_clean_failure(result, out, "empty", "holds no samples")


def test_folder_of_unrelated_files(run_cli, tiny_cnn, tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    (folder / "photo.bmp").write_bytes(b"BM....")
    out = tmp_path / "out.onnx"
    result = _quantize(run_cli, tiny_cnn, folder, out)
    _assert_clean_failure(result, out, "junk", "holds no samples")


def test_unreadable_sample(run_cli, tiny_cnn, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "s00000.npy").write_bytes(b"\x93NUMPY garbage")
    out = tmp_path / "out.onnx"
    result = _quantize(run_cli, tiny_cnn, folder, out)
    _assert_clean_failure(result, out, "s00000.npy", "could not be read")


def test_pickled_sample_is_not_unpickled(run_cli, tiny_cnn, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    np.save(folder / "s00000.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    out = tmp_path / "out.onnx"
    result = _quantize(run_cli, tiny_cnn, folder, out)
    _assert_clean_failure(result, out, "s00000.npy", "could not be read")


@pytest.mark.parametrize(
    ("array", "fragments"),
    [
        (np.zeros((1, 3, 8, 8), np.float64), ("dtype float64", "expects float32")),
        (np.zeros((8, 8), np.float32), ("rank 2", "expects (N,3,8,8)")),
        (np.zeros((1, 3, 8, 9), np.float32), ("(1,3,8,9)", "expects (N,3,8,8)")),
        (np.full((1, 3, 8, 8), np.nan, np.float32), ("NaN or Inf",)),
        (np.full((3, 8, 8), np.inf, np.float32), ("NaN or Inf",)),
    ],
    ids=["wrong-dtype", "wrong-rank", "wrong-static-dim", "nan", "inf"],
)
def test_sample_that_does_not_fit_the_model(run_cli, tiny_cnn, tmp_path, array, fragments):
    folder = testing.write_samples(tmp_path / "data", [{"input": array}])
    out = tmp_path / "out.onnx"
    result = _quantize(run_cli, tiny_cnn, folder, out)
    _assert_clean_failure(result, out, "s00000.npy", "'input'", *fragments)


def test_npz_missing_an_input(run_cli, tiny_cnn, tmp_path):
    folder = tmp_path / "npz"
    folder.mkdir()
    np.savez(folder / "s00000.npz", image=np.zeros((1, 3, 8, 8), np.float32))
    out = tmp_path / "out.onnx"
    result = _quantize(run_cli, tiny_cnn, folder, out)
    _assert_clean_failure(result, out, "s00000.npz", "no array for input 'input'", "image")


def test_sample_without_batch_dim_is_accepted(run_cli, tiny_cnn, tmp_path):
    folder = testing.write_samples(
        tmp_path / "nobatch", [{"input": np.ones((3, 8, 8), np.float32)}]
    )
    out = tmp_path / "out.onnx"
    result = _quantize(run_cli, tiny_cnn, folder, out)
    assert result.code == 0, result.err
    assert out.exists()


def test_input_model_is_never_modified(run_cli, tiny_cnn, tmp_path):
    before = sha256(tiny_cnn)
    out = tmp_path / "out.onnx"
    assert _quantize(run_cli, tiny_cnn, tmp_path / "calib", out).code == 0
    assert sha256(tiny_cnn) == before


def test_missing_data_option_is_a_usage_error(run_cli, tiny_cnn, tmp_path):
    result = run_cli("quantize", tiny_cnn, "-o", tmp_path / "out.onnx")
    assert result.code == 2
    assert "--data" in result.err
    assert not (tmp_path / "out.onnx").exists()


def test_a_dim_written_as_minus_one_is_dynamic(run_cli, tmp_path):
    model = testing.conv_bn_relu()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value, dims[3].dim_value = -1, -1  # as paddle2onnx writes dynamic dims
    path = testing.save(model, tmp_path / "paddle_style.onnx")
    folder = testing.write_samples(
        tmp_path / "data", [{"input": np.ones((1, 3, 8, 8), np.float32)}]
    )
    out = tmp_path / "out.onnx"
    result = _quantize(run_cli, path, folder, out)
    assert result.code == 0, result.err
