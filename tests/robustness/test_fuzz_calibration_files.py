"""Mutation fuzzing of calibration files: a damaged file is refused with exit 3 and nothing
is written; a file whose damage happens to leave it valid quantizes soundly."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import qconvert
from qconvert import api, testing
from qconvert.errors import QconvertError
from robustness.fuzzing import fuzz_settings

FUZZ = fuzz_settings(60)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibrated")
    model = testing.conv_bn_relu(channels=4)
    path = testing.save(model, folder / "model.onnx")
    data = testing.write_samples(
        folder / "calib", [testing.random_inputs(model, seed=i) for i in range(2)]
    )
    calib = folder / "model.calib.json"
    api.calibrate(path, data, output=calib)
    return Calibrated(path, calib.read_bytes())


class Calibrated(tuple):
    """(model path, calibration file bytes), short in hypothesis's failure reports."""

    def __new__(cls, model, data):
        return super().__new__(cls, (model, data))

    def __repr__(self) -> str:
        return f"Calibrated({self[0].name}, {len(self[1])} bytes)"


def _attempt(tmp_path, model, data: bytes) -> None:
    calib = tmp_path / "mutant.calib.json"
    calib.write_bytes(data)
    out = tmp_path / "q.onnx"
    if out.exists():
        out.unlink()
    try:
        qconvert.quantize(model, out, calib=calib)
    except QconvertError as error:
        assert error.exit_code == 3, error
        assert "\n" not in str(error)
        assert not out.exists()
    else:
        assert out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@FUZZ
@given(fraction=st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
def test_truncated_calibration_files(tmp_path, calibrated, fraction):
    model, data = calibrated
    _attempt(tmp_path, model, data[: int(len(data) * fraction)])


@FUZZ
@given(
    flips=st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
        min_size=1,
        max_size=6,
    )
)
def test_flipped_bytes_in_calibration_files(tmp_path, calibrated, flips):
    model, data = calibrated
    mutant = bytearray(data)
    for where, mask in flips:
        mutant[int(where * len(mutant))] ^= mask
    _attempt(tmp_path, model, bytes(mutant))


def _paths(node, prefix=()):
    """Every key path in a JSON document (lists indexed), for dropping and retyping."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list) and node:
        yield (*prefix, 0)
        yield from _paths(node[0], (*prefix, 0))


@FUZZ
@given(
    choice=st.integers(min_value=0, max_value=10_000),
    action=st.sampled_from(["drop", "null", "string", "negative", "huge", "nan", "list"]),
)
def test_damaged_fields_in_calibration_files(tmp_path, calibrated, choice, action):
    model, data = calibrated
    document = json.loads(data)
    paths = list(_paths(document))
    path = paths[choice % len(paths)]
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    replacement = {
        "null": None,
        "string": "x",
        "negative": -7,
        "huge": 1e308,
        "nan": float("nan"),
        "list": [],
    }
    if action == "drop":
        if isinstance(parent, dict):
            del parent[last]
        else:
            parent.pop(last)
    else:
        parent[last] = replacement[action]
    _attempt(tmp_path, model, json.dumps(document).encode())
