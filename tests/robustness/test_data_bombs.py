"""Sample files that would unpack to far more than their size are refused before reading."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from qconvert import testing


@pytest.fixture
def model(tmp_path):
    return testing.save(testing.conv_bn_relu(), tmp_path / "model.onnx")


def _npz_bomb(path, megabytes: int) -> None:
    """A zip holding one .npy member whose zeros unpack to `megabytes` MiB (1000x smaller)."""
    count = megabytes * 2**20 // 4
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (count,)}
    )
    chunk = b"\0" * (16 << 20)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("input.npy", "w", force_zip64=True) as member:
            member.write(header.getvalue())
            for _ in range(count * 4 // len(chunk)):
                member.write(chunk)


def test_npz_that_unpacks_past_the_limit(run_cli, model, tmp_path):
    folder = tmp_path / "bomb"
    folder.mkdir()
    _npz_bomb(folder / "s00000.npz", megabytes=256)
    packed = (folder / "s00000.npz").stat().st_size
    assert packed < 2**20  # under a megabyte on disk
    out = tmp_path / "q.onnx"
    limit = str(64 * 2**20)
    result = run_cli(
        "quantize", model, "--data", folder, "-o", out, "--max-sample-bytes", limit
    )
    assert result.code == 3
    assert "s00000.npz' unpacks to 268,435,5" in result.err  # 256 MiB + the header's bytes
    assert "over the limit of 67,108,864" in result.err
    assert not out.exists()


def test_sample_limit_is_adjustable(run_cli, model, tmp_path):
    folder = testing.write_samples(
        tmp_path / "data", [testing.random_inputs(testing.conv_bn_relu(), seed=0)]
    )
    out = tmp_path / "q.onnx"
    result = run_cli(
        "quantize", model, "--data", folder, "-o", out, "--max-sample-bytes", "100"
    )
    assert result.code == 3
    assert "over the limit of 100. Hint: raise the limit with --max-sample-bytes" in result.err
    assert not out.exists()


@pytest.mark.parametrize(
    ("side", "fragment"),
    [
        (12000, "huge.png' is 12000x12000 pixels, over the limit of 100,000,000."),
        (20000, "huge.png' is over 200,000,000 pixels, over the limit of 100,000,000."),
    ],
    ids=["over-the-limit", "over-twice-the-limit"],
)
def test_image_with_absurd_dimensions(run_cli, tmp_path, side, fragment):
    from PIL import Image

    image_model = testing.save(testing.conv_bn_relu(), tmp_path / "model.onnx")
    folder = tmp_path / "images"
    folder.mkdir()
    # One colour: tiny on disk, hundreds of megapixels decoded.
    Image.new("1", (side, side)).save(folder / "huge.png", optimize=True)
    out = tmp_path / "q.onnx"
    result = run_cli("quantize", image_model, "--data", folder, "-o", out, "--image-size", "8")
    assert result.code == 3
    assert fragment in result.err
    assert "--max-image-pixels" in result.err
    assert not out.exists()
