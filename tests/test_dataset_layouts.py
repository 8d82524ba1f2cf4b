"""Every data-folder layout reads back the samples written, checked against the model."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from PIL import Image

from qconvert import model as model_io
from qconvert import testing
from qconvert.dataset import DirectorySource, ImagePreprocessing, input_specs
from qconvert.errors import CalibrationDataError


def _specs(model: onnx.ModelProto, tmp_path):
    path = testing.save(model, tmp_path / "model.onnx")
    return path, input_specs(model_io.load_model(path))


def _two_input_samples(count=5):
    rng = np.random.default_rng(0)
    return [
        {name: rng.standard_normal((1, 8)).astype(np.float32) for name in ("a", "b")}
        for _ in range(count)
    ]


def _assert_read(source, expected):
    samples = list(source)
    assert len(source) == len(samples) == len(expected)
    for sample, feeds in zip(samples, expected, strict=True):
        assert set(sample.feeds) == set(feeds)
        for name, array in feeds.items():
            np.testing.assert_array_equal(sample.feeds[name], array)


def test_npz_per_sample_for_a_multi_input_model(tmp_path):
    _, specs = _specs(testing.two_inputs(), tmp_path)
    expected = _two_input_samples()
    folder = testing.write_samples(tmp_path / "data", expected)
    source = DirectorySource(folder, specs)
    assert source.layout == "file-per-sample"
    _assert_read(source, expected)


def test_onnx_test_data_folders(tmp_path):
    _, specs = _specs(testing.two_inputs(), tmp_path)
    expected = _two_input_samples(12)
    for index, feeds in enumerate(expected):
        folder = tmp_path / "data" / f"test_data_set_{index}"
        folder.mkdir(parents=True)
        # Written in reverse input order, named: matched by name, not position.
        for position, name in enumerate(("b", "a")):
            tensor = onnx.numpy_helper.from_array(feeds[name], name)
            (folder / f"input_{position}.pb").write_bytes(tensor.SerializeToString())
    source = DirectorySource(tmp_path / "data", specs)
    assert source.layout == "onnx-test-data"
    _assert_read(source, expected)  # test_data_set_10 after _9: natural order


def test_onnx_test_data_unnamed_tensors_match_by_position(tmp_path):
    _, specs = _specs(testing.two_inputs(), tmp_path)
    expected = _two_input_samples(2)
    for index, feeds in enumerate(expected):
        folder = tmp_path / "data" / f"test_data_set_{index}"
        folder.mkdir(parents=True)
        for position, name in enumerate(("a", "b")):
            tensor = onnx.numpy_helper.from_array(feeds[name])
            (folder / f"input_{position}.pb").write_bytes(tensor.SerializeToString())
    _assert_read(DirectorySource(tmp_path / "data", specs), expected)


def test_corrupt_pb_names_the_file(tmp_path):
    _, specs = _specs(testing.two_inputs(), tmp_path)
    folder = tmp_path / "data" / "test_data_set_0"
    folder.mkdir(parents=True)
    (folder / "input_0.pb").write_bytes(b"\xff\xff\xff not a tensor")
    with pytest.raises(CalibrationDataError, match=r"input_0\.pb' could not be read"):
        list(DirectorySource(tmp_path / "data", specs))


def test_one_npy_per_input_with_a_leading_batch_dim(tmp_path):
    _, specs = _specs(testing.two_inputs(), tmp_path)
    expected = _two_input_samples(7)
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("a", "b"):
        np.save(folder / f"{name}.npy", np.concatenate([s[name] for s in expected]))
    source = DirectorySource(folder, specs)
    assert source.layout == "file-per-input"
    _assert_read(source, expected)


def test_one_npy_per_input_with_different_counts(tmp_path):
    _, specs = _specs(testing.two_inputs(), tmp_path)
    folder = tmp_path / "data"
    folder.mkdir()
    np.save(folder / "a.npy", np.zeros((3, 8), np.float32))
    np.save(folder / "b.npy", np.zeros((4, 8), np.float32))
    with pytest.raises(CalibrationDataError, match=r"different numbers of samples \(a.npy: 3"):
        DirectorySource(folder, specs)


def test_one_subfolder_per_input(tmp_path):
    _, specs = _specs(testing.two_inputs(), tmp_path)
    expected = _two_input_samples(4)
    for name in ("a", "b"):
        testing.write_samples(tmp_path / "data" / name, [{name: s[name]} for s in expected])
    source = DirectorySource(tmp_path / "data", specs)
    assert source.layout == "folder-per-input"
    _assert_read(source, expected)


def test_subfolders_with_different_files(tmp_path):
    _, specs = _specs(testing.two_inputs(), tmp_path)
    expected = _two_input_samples(3)
    testing.write_samples(tmp_path / "data" / "a", [{"a": s["a"]} for s in expected])
    testing.write_samples(tmp_path / "data" / "b", [{"b": s["b"]} for s in expected[:2]])
    with pytest.raises(CalibrationDataError, match="hold different sample files"):
        DirectorySource(tmp_path / "data", specs)


def _image_model(channels=3, size=6, layout="NCHW"):
    dims = f"N,{channels},{size},{size}" if layout == "NCHW" else f"N,{size},{size},{channels}"
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        image_model (float[{dims}] image) => (float[{dims}] output) {{
            output = Relu (image)
        }}
    """
    return onnx.parser.parse_model(text)


def _write_image(path, pixels):
    Image.fromarray(pixels).save(path)


def test_images_with_stated_preprocessing(tmp_path):
    _, specs = _specs(_image_model(), tmp_path)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    (tmp_path / "images").mkdir()
    _write_image(tmp_path / "images" / "a.png", pixels)
    preprocessing = ImagePreprocessing(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), color="BGR")
    source = DirectorySource(tmp_path / "images", specs, images=preprocessing)
    assert source.layout == "images"
    (sample,) = list(source)
    expected = (pixels[:, :, ::-1] / 255.0 - np.array([0.5, 0.4, 0.3])) / np.array(
        [0.2, 0.25, 0.3]
    )
    expected = expected.transpose(2, 0, 1)[np.newaxis].astype(np.float32)
    np.testing.assert_allclose(sample.feeds["image"], expected, rtol=1e-5, atol=1e-5)


def test_images_nhwc_grayscale_resized_and_cropped(tmp_path):
    _, specs = _specs(_image_model(channels=1, size=4, layout="NHWC"), tmp_path)
    gray = np.tile(np.arange(8, dtype=np.uint8) * 30, (4, 1))  # 4 high, 8 wide: a ramp
    (tmp_path / "images").mkdir()
    _write_image(tmp_path / "images" / "g.png", gray)
    resized = list(
        DirectorySource(tmp_path / "images", specs, images=ImagePreprocessing(scale=1.0))
    )
    cropped = list(
        DirectorySource(
            tmp_path / "images", specs, images=ImagePreprocessing(scale=1.0, crop=True)
        )
    )
    assert resized[0].feeds["image"].shape == (1, 4, 4, 1)
    # Crop keeps the middle of the ramp at full resolution (columns 2..5).
    np.testing.assert_array_equal(cropped[0].feeds["image"][0, 0, :, 0], gray[0, 2:6])
    # Resize squeezes the whole ramp: it spans wider values.
    row = resized[0].feeds["image"][0, 0, :, 0]
    assert row[0] < gray[0, 2] and row[-1] > gray[0, 5]


def test_image_size_from_options_for_dynamic_dims(tmp_path):
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        dyn (float[N,3,H,W] image) => (float[N,3,H,W] output) { output = Relu (image) }
    """
    _, specs = _specs(onnx.parser.parse_model(text), tmp_path)
    (tmp_path / "images").mkdir()
    _write_image(tmp_path / "images" / "a.jpg", np.zeros((10, 12, 3), np.uint8))
    with pytest.raises(CalibrationDataError, match=r"dynamic image size.*--image-size"):
        DirectorySource(tmp_path / "images", specs)
    source = DirectorySource(
        tmp_path / "images", specs, images=ImagePreprocessing(size=(5, 7))
    )
    assert source.first().feeds["image"].shape == (1, 3, 5, 7)


def test_unreadable_image_fails_cleanly(run_cli, tmp_path):
    path, _ = _specs(_image_model(), tmp_path)
    folder = tmp_path / "images"
    folder.mkdir()
    _write_image(folder / "good.png", np.zeros((6, 6, 3), np.uint8))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    out = tmp_path / "c.json"
    result = run_cli("calibrate", path, "--data", folder, "-o", out)
    assert result.code == 3, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "broken.jpg' could not be read" in lines[0]
    assert not out.exists()


def test_calibrate_cli_reads_an_image_folder(run_cli, tmp_path):
    path, _ = _specs(_image_model(), tmp_path)
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(3):
        _write_image(folder / f"{index}.png", np.full((9, 9, 3), 60 * index, np.uint8))
    out = tmp_path / "c.json"
    result = run_cli(
        "calibrate",
        path,
        "--data",
        folder,
        "-o",
        out,
        "--mean",
        "0.5",
        "--std",
        "0.5",
        "--image-size",
        "6",
    )
    assert result.code == 0, result.err
    from qconvert.calibration import read_calibration

    stats = read_calibration(out).observers["image"]
    assert stats.min == pytest.approx(-1.0)
    assert stats.max == pytest.approx((120 / 255 - 0.5) / 0.5, rel=1e-5)


def test_subset_is_reproducible_and_ordered(tmp_path):
    _, specs = _specs(testing.two_inputs(), tmp_path)
    folder = testing.write_samples(tmp_path / "data", _two_input_samples(20))
    source = DirectorySource(folder, specs)
    first = [s.source for s in source.subset(6, seed=3)]
    assert first == [s.source for s in source.subset(6, seed=3)]
    assert first == sorted(first)
    assert first != [s.source for s in source.subset(6, seed=4)]
    assert len(source.subset(100)) == 20


@pytest.mark.parametrize("layout", ["file-per-sample", "folder-per-input"])
def test_an_npy_sample_over_the_size_limit_is_refused_by_name(tmp_path, layout):
    from qconvert.limits import LoadLimits

    model = testing.two_inputs() if layout == "folder-per-input" else testing.conv_bn_relu()
    _, specs = _specs(model, tmp_path)
    data = tmp_path / "data"
    for spec in specs:
        folder = data / spec.name if layout == "folder-per-input" else data
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(2):
            shape = tuple(1 if d is None else d for d in spec.dims)
            np.save(folder / f"s{i}.npy", np.zeros(shape, dtype=spec.dtype))
    big = sorted(data.rglob("s0.npy"))[0]  # the first file read
    limit = big.stat().st_size - 1
    source = DirectorySource(data, specs, limits=LoadLimits(max_sample_bytes=limit))
    with pytest.raises(
        CalibrationDataError, match=f"'{big}' unpacks to .* limit of {limit:,}"
    ):
        list(source)
