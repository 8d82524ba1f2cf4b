"""Telling whether a model file refers to external data without parsing its weights."""

from __future__ import annotations

import pytest

from qconvert import model as model_io
from qconvert import testing

_CHUNK = 1 << 20


def _refuse_parsing(monkeypatch):
    def parse(*args, **kwargs):
        raise AssertionError("the inline model was parsed")

    monkeypatch.setattr(model_io.onnx, "load_model", parse)


def test_an_inline_model_is_sized_without_parsing_it(tmp_path, monkeypatch):
    path = testing.save(testing.matmul_add(k=512, n=256), tmp_path / "m.onnx")
    _refuse_parsing(monkeypatch)
    assert model_io.uses_external_data(path) is False
    assert model_io.file_size(path) == path.stat().st_size


def test_a_model_with_external_data_counts_its_data_file(tmp_path):
    path = testing.save_with_external_data(
        testing.matmul_add(k=512, n=256), tmp_path / "m.onnx"
    )
    data = [p for p in tmp_path.iterdir() if p != path]
    assert model_io.uses_external_data(path) is True
    assert model_io.file_size(path) == path.stat().st_size + sum(
        p.stat().st_size for p in data
    )
    assert model_io.file_size(path) > 512 * 256 * 4


@pytest.mark.parametrize(
    "offset", [0, _CHUNK - 8, _CHUNK - 5, _CHUNK - 1, _CHUNK, 2 * _CHUNK + 3]
)
def test_the_key_is_found_wherever_it_falls_against_the_read_chunks(tmp_path, offset):
    content = bytearray(b"\x00" * (3 * _CHUNK))
    content[offset : offset + 8] = b"location"
    path = tmp_path / "f.onnx"
    path.write_bytes(bytes(content[: 3 * _CHUNK]))
    assert model_io._may_name_external_data(path)
    content[offset : offset + 8] = b"locatioX"
    path.write_bytes(bytes(content[: 3 * _CHUNK]))
    assert not model_io._may_name_external_data(path)
