"""The fast .npy reader gives what np.load gives, or np.load's error."""

from __future__ import annotations

import numpy as np
import pytest

from qconvert.npy import TooLargeError, read_npy

ARRAYS = {
    "float32": np.random.default_rng(0).standard_normal((1, 3, 4, 5)).astype(np.float32),
    "int64": np.arange(12, dtype=np.int64).reshape(3, 4),
    "float16": np.linspace(-2, 2, 7).astype(np.float16),
    "bool": np.array([True, False, True]),
    "big-endian": np.arange(6, dtype=">f4").reshape(2, 3),
    "scalar": np.array(3.5, dtype=np.float32),
    "empty": np.zeros((0, 4), dtype=np.float32),
    "fortran": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
    "structured": np.array([(1, 2.0)], dtype=[("a", "<i4"), ("b", "<f8")]),
}


@pytest.mark.parametrize("name", sorted(ARRAYS))
@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_reads_what_np_load_reads(tmp_path, name, version):
    array = ARRAYS[name]
    path = tmp_path / "a.npy"
    with open(path, "wb") as file:
        np.lib.format.write_array(file, array, version=version)
    read = read_npy(path, 1 << 20)
    assert read.dtype == array.dtype and read.shape == array.shape
    np.testing.assert_array_equal(read, array)
    assert read.flags.writeable


def test_the_same_header_in_many_files_reads_each_files_own_values(tmp_path):
    for i in range(3):
        np.save(tmp_path / f"{i}.npy", np.full((2, 2), i, dtype=np.float32))
    assert [float(read_npy(tmp_path / f"{i}.npy", 1 << 20)[0, 0]) for i in range(3)] == [
        0.0,
        1.0,
        2.0,
    ]


def test_a_truncated_file_fails_like_np_load(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.zeros((10, 10), dtype=np.float32))
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError):
        read_npy(path, 1 << 20)


def test_an_object_array_is_refused_not_unpickled(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        read_npy(path, 1 << 20)


def test_a_file_over_the_limit_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.zeros(1000, dtype=np.float32))
    with pytest.raises(TooLargeError) as error:
        read_npy(path, 1000)
    assert error.value.size == path.stat().st_size


def test_a_plain_sample_is_read_without_parsing_its_header_again(tmp_path, monkeypatch):
    # np.load parses each header with ast; the reader parses a header text once.
    for i in range(2):
        np.save(tmp_path / f"{i}.npy", np.full((1, 8), i, dtype=np.float32))
    read_npy(tmp_path / "0.npy", 1 << 20)

    def no_load(*args, **kwargs):
        raise AssertionError("np.load called")

    def no_parse(*args, **kwargs):
        raise AssertionError("header parsed again")

    monkeypatch.setattr(np, "load", no_load)
    monkeypatch.setattr("qconvert.npy.ast.literal_eval", no_parse)
    assert read_npy(tmp_path / "1.npy", 1 << 20)[0, 0] == 1.0
