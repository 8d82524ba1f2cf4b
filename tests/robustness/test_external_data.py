"""External data cannot escape the model's folder; oversized declarations are refused."""

from __future__ import annotations

import os

import onnx
import pytest

from qconvert import testing


def _model_with_external_data(folder, location="weights.bin"):
    model = testing.conv_bn_relu()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(
        model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0
    )
    if location != "weights.bin":
        proto = onnx.load_model(str(path), load_external_data=False)
        for tensor in proto.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save_model(proto, str(path))
    return path


def _quantize(run_cli, model, tmp_path):
    calib = testing.write_samples(
        tmp_path / "calib", [testing.random_inputs(testing.conv_bn_relu(), seed=0)]
    )
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir(exist_ok=True)
    return run_cli("quantize", model, "--data", calib, "-o", out), out


def test_model_with_external_data_inside_its_folder_loads(run_cli, tmp_path):
    model = _model_with_external_data(tmp_path / "m")
    result, out = _quantize(run_cli, model, tmp_path)
    assert result.code == 0, result.err
    assert out.exists()


@pytest.mark.parametrize(
    ("location", "fragment"),
    [
        ("/etc/hostname", "absolute path '/etc/hostname'"),
        ("../outside.bin", "outside the model's folder ('../outside.bin')"),
        ("sub/../../outside.bin", "outside the model's folder"),
    ],
    ids=["absolute", "dot-dot", "nested-dot-dot"],
)
def test_external_data_escaping_the_folder_is_refused(run_cli, tmp_path, location, fragment):
    (tmp_path / "outside.bin").write_bytes(b"\0" * 4096)
    model = _model_with_external_data(tmp_path / "m", location)
    result, out = _quantize(run_cli, model, tmp_path)
    assert result.code == 3
    assert "external data of tensor" in result.err and fragment in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert not out.exists()


def test_symlink_leading_out_of_the_folder_is_refused(run_cli, tmp_path):
    model = _model_with_external_data(tmp_path / "m")
    real = tmp_path / "m" / "weights.bin"
    outside = tmp_path / "elsewhere.bin"
    os.replace(real, outside)
    os.symlink(outside, real)
    result, out = _quantize(run_cli, model, tmp_path)
    assert result.code == 3
    assert "link leading outside the model's folder ('weights.bin')" in result.err
    assert not out.exists()


def test_missing_external_data_file(run_cli, tmp_path):
    model = _model_with_external_data(tmp_path / "m")
    (tmp_path / "m" / "weights.bin").unlink()
    result, out = _quantize(run_cli, model, tmp_path)
    assert result.code == 3
    assert "refers to 'weights.bin', which does not exist" in result.err
    assert not out.exists()


def test_tensor_declaring_more_bytes_than_allowed_is_refused(run_cli, tmp_path):
    # Declared dims of 2^40 floats with 4 bytes of data: a loader that trusts the dims
    # would try to allocate 4 TiB.
    model = testing.conv_bn_relu()
    model.graph.initializer[0].dims[:] = [1 << 20, 1 << 20]
    path = tmp_path / "bomb.onnx"
    onnx.save_model(model, str(path))
    result, out = _quantize(run_cli, path, tmp_path)
    assert result.code == 3
    assert "declares 4,398,046,511,104 bytes, over the limit" in result.err
    assert not out.exists()


def test_the_tensor_size_limit_is_adjustable(run_cli, tmp_path):
    model = testing.save(testing.conv_bn_relu(), tmp_path / "model.onnx")
    # fc_w is 10 x 128 floats = 5,120 bytes: refused under a 4 KiB limit, fine at default.
    tight = run_cli("inspect", model, "--max-tensor-bytes", "4096")
    assert tight.code == 3
    assert "tensor 'fc_w' declares 5,120 bytes, over the limit of 4,096" in tight.err
    assert run_cli("inspect", model).code == 0


def test_tensor_storing_fewer_elements_than_it_declares(run_cli, tmp_path):
    model = testing.conv_bn_relu()
    model.graph.initializer[0].dims[0] = 9  # conv_w holds 8 x 3 x 3 x 3 floats
    path = tmp_path / "lying.onnx"
    onnx.save_model(model, str(path))
    result, out = _quantize(run_cli, path, tmp_path)
    assert result.code == 3
    assert "tensor 'conv_w' declares 243 elements but stores 216" in result.err
    assert not out.exists()


def test_protobuf_over_two_gigabytes_is_refused_before_parsing(run_cli, tmp_path):
    # A sparse file: 2 GiB + 1 byte on paper, nothing on disk. Protobuf cannot hold it, and
    # a parser fed it would allocate gigabytes first.
    model = testing.save(testing.conv_bn_relu(), tmp_path / "big.onnx")
    os.truncate(model, 2**31 + 1)
    result = run_cli("inspect", model)
    assert result.code == 3
    assert result.err.strip() == (
        f"Error: Model file '{model}' is over protobuf's 2 GB limit. Hint: models this "
        "large must keep their weights in external data files."
    )
