"""`qconvert calibrate` and `quantize --calib` end to end, and every bad input of the issue."""

from __future__ import annotations

import json
import struct

import numpy as np
import onnx
import pytest
from conftest import SAMPLES

from qconvert import testing
from qconvert.calibration import RangeMethod, derive_ranges, read_calibration

METHODS = ("minmax", "percentile", "entropy", "mse")


def _assert_clean_failure(result, out, *fragments, code=3):
    assert result.code == code, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("Error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture
def calibrated(run_cli, tiny_cnn, tmp_path):
    out = tmp_path / "model.calib.json"
    result = run_cli("calibrate", tiny_cnn, "--data", tmp_path / "calib", "-o", out)
    assert result.code == 0, result.err
    return out


def test_calibrate_writes_a_readable_file(run_cli, tiny_cnn, tmp_path, calibrated):
    text = calibrated.read_text()
    document = json.loads(text)
    assert document["format"] == "qconvert-calibration"
    assert document["version"] == 1
    assert document["samples"] == 32
    assert document["model"]["file"] == "model.onnx"
    assert len(document["model"]["sha256"]) == 64
    entry = document["tensors"]["relu"]
    assert entry["min"] == 0.0 and entry["max"] > 0
    assert sum(entry["bins"]) == entry["count"]  # small tensors: every value histogrammed
    assert len(text.splitlines()) < 20 + len(document["tensors"])  # one line per tensor


def test_default_output_is_beside_the_model(run_cli, tiny_cnn, tmp_path):
    result = run_cli("calibrate", tiny_cnn, "--data", tmp_path / "calib")
    assert result.code == 0, result.err
    assert (tmp_path / "model.calib.json").exists()


@pytest.mark.parametrize("method", METHODS)
def test_quantize_with_calib_equals_quantize_with_data(
    run_cli, tiny_cnn, tmp_path, calibrated, method
):
    from_file, on_the_fly = tmp_path / "a.onnx", tmp_path / "b.onnx"
    common = ("--method", method)
    assert (
        run_cli("quantize", tiny_cnn, "--calib", calibrated, "-o", from_file, *common).code
        == 0
    )
    assert (
        run_cli(
            "quantize", tiny_cnn, "--data", tmp_path / "calib", "-o", on_the_fly, *common
        ).code
        == 0
    )
    assert from_file.read_bytes() == on_the_fly.read_bytes()


def test_methods_give_different_models(run_cli, tiny_cnn, tmp_path, calibrated):
    outputs = {}
    for method in METHODS:
        out = tmp_path / f"{method}.onnx"
        result = run_cli(
            "quantize", tiny_cnn, "--calib", calibrated, "--method", method, "-o", out
        )
        assert result.code == 0, result.err
        outputs[method] = out.read_bytes()
    assert len(set(outputs.values())) == len(METHODS)


def test_merge_of_two_halves_equals_one_run(run_cli, tmp_path):
    folder = SAMPLES / "digits_dwsep"
    model = folder / "model.onnx"
    files = sorted((folder / "calib").glob("*.npy"))[:64]
    halves = [tmp_path / "first", tmp_path / "second", tmp_path / "all"]
    for half in halves:
        half.mkdir()
    for index, path in enumerate(files):
        target = halves[0] if index < 32 else halves[1]
        (target / path.name).write_bytes(path.read_bytes())
        (halves[2] / path.name).write_bytes(path.read_bytes())
    for half in halves:
        result = run_cli(
            "calibrate", model, "--data", half, "-o", tmp_path / f"{half.name}.json"
        )
        assert result.code == 0, result.err
    merged = tmp_path / "merged.json"
    result = run_cli(
        "calibrate", "--merge", tmp_path / "first.json", tmp_path / "second.json", "-o", merged
    )
    assert result.code == 0, result.err
    whole = json.loads((tmp_path / "all.json").read_text())
    assert json.loads(merged.read_text()) == whole
    one, two = read_calibration(tmp_path / "all.json"), read_calibration(merged)
    for method in METHODS:
        chosen = RangeMethod(name=method)
        assert derive_ranges(one.observers, chosen) == derive_ranges(two.observers, chosen)


def test_batched_calibration_matches_unbatched_minmax(run_cli, tmp_path):
    folder = SAMPLES / "digits_cnn"
    data = tmp_path / "data"
    data.mkdir()
    for path in sorted((folder / "calib").glob("*.npy"))[:40]:
        (data / path.name).write_bytes(path.read_bytes())
    for batch in ("1", "16"):
        result = run_cli(
            "calibrate",
            folder / "model.onnx",
            "--data",
            data,
            "-o",
            tmp_path / f"b{batch}.json",
            "--batch-size",
            batch,
        )
        assert result.code == 0, result.err
    one, sixteen = (
        read_calibration(tmp_path / "b1.json"),
        read_calibration(tmp_path / "b16.json"),
    )
    assert one.samples == sixteen.samples == 40
    for name, observer in one.observers.items():
        other = sixteen.observers[name]
        assert other.count == observer.count
        np.testing.assert_allclose(
            [other.min, other.max], [observer.min, observer.max], rtol=1e-5, atol=1e-6
        )


def test_batch_size_needs_a_dynamic_batch_dim(run_cli, tmp_path):
    model = testing.conv_bn_relu()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    path = testing.save(model, tmp_path / "static.onnx")
    testing.write_samples(tmp_path / "calib", [testing.random_inputs(model, seed=0)])
    out = tmp_path / "c.json"
    result = run_cli(
        "calibrate", path, "--data", tmp_path / "calib", "-o", out, "--batch-size", "4"
    )
    _assert_clean_failure(result, out, "--batch-size 4", "'input'", "static", code=2)


@pytest.mark.parametrize("method", METHODS)
def test_samples_of_different_lengths_work_for_every_method(run_cli, tmp_path, method):
    model = testing.sequence_mlp()
    path = testing.save(model, tmp_path / "seq.onnx")
    rng = np.random.default_rng(0)
    samples = [
        {"tokens": rng.standard_normal((1, length, 8)).astype(np.float32)}
        for length in (3, 7, 7, 12, 5, 1, 9, 7)
    ]
    testing.write_samples(tmp_path / "calib", samples)
    calib = tmp_path / "seq.calib.json"
    result = run_cli(
        "calibrate", path, "--data", tmp_path / "calib", "-o", calib, "--batch-size", "4"
    )
    assert result.code == 0, result.err
    stats = read_calibration(calib).observers
    assert stats["tokens"].count == 8 * sum(s["tokens"].shape[1] for s in samples)
    expected_max = max(float(s["tokens"].max()) for s in samples)
    assert stats["tokens"].max == expected_max
    out = tmp_path / f"seq.{method}.onnx"
    result = run_cli("quantize", path, "--calib", calib, "--method", method, "-o", out)
    assert result.code == 0, result.err
    sqnr = testing.output_sqnr(model, out, samples)
    assert sqnr > 20, sqnr


def test_samples_takes_a_seeded_subset(run_cli, tiny_cnn, tmp_path):
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        result = run_cli(
            "calibrate",
            tiny_cnn,
            "--data",
            tmp_path / "calib",
            "-o",
            tmp_path / f"{name}.json",
            "--samples",
            "5",
            "--seed",
            seed,
        )
        assert result.code == 0, result.err
    a, b, c = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "abc")
    assert a["samples"] == 5
    assert a == b
    assert a["tensors"] != c["tensors"]


def test_trt_cache_holds_scales_as_big_endian_float_hex(
    run_cli, tiny_cnn, tmp_path, calibrated
):
    out, cache = tmp_path / "again.json", tmp_path / "model.cache"
    result = run_cli(
        "calibrate",
        tiny_cnn,
        "--data",
        tmp_path / "calib",
        "-o",
        out,
        "--trt-cache",
        cache,
        "--trt-method",
        "minmax",
    )
    assert result.code == 0, result.err
    lines = cache.read_text().splitlines()
    assert lines[0] == "TRT-8601-MinMaxCalibration"
    stats = read_calibration(out).observers
    entries = dict(line.split(": ") for line in lines[1:])
    assert set(entries) == set(stats)
    for name, hex_scale in entries.items():
        scale = struct.unpack(">f", bytes.fromhex(hex_scale))[0]
        amax = max(abs(stats[name].min), abs(stats[name].max))
        assert scale == pytest.approx(amax / 127, rel=1e-6)


def test_trt_cache_default_is_entropy(run_cli, tiny_cnn, tmp_path):
    cache = tmp_path / "model.cache"
    result = run_cli(
        "calibrate",
        tiny_cnn,
        "--data",
        tmp_path / "calib",
        "-o",
        tmp_path / "c.json",
        "--trt-cache",
        cache,
    )
    assert result.code == 0, result.err
    assert cache.read_text().startswith("TRT-8601-EntropyCalibration2\n")


# --- bad inputs: one line naming the cause, exit 3, nothing written ---------------------


def test_empty_folder(run_cli, tiny_cnn, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "c.json"
    result = run_cli("calibrate", tiny_cnn, "--data", tmp_path / "empty", "-o", out)
    _assert_clean_failure(result, out, "empty", "holds no samples")


def test_folder_of_unrelated_files(run_cli, tiny_cnn, tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    (folder / "data.csv").write_text("1,2,3")
    out = tmp_path / "c.json"
    result = run_cli("calibrate", tiny_cnn, "--data", folder, "-o", out)
    _assert_clean_failure(result, out, "junk", "holds no samples")


@pytest.mark.parametrize(
    ("array", "fragments"),
    [
        (np.zeros((1, 3, 8, 8), np.float64), ("dtype float64", "expects float32")),
        (np.zeros((8, 8), np.float32), ("rank 2", "expects (N,3,8,8)")),
        (np.zeros((1, 3, 8, 9), np.float32), ("(1,3,8,9)", "expects (N,3,8,8)")),
        (np.full((1, 3, 8, 8), np.nan, np.float32), ("NaN or Inf",)),
        (np.full((1, 3, 8, 8), -np.inf, np.float32), ("NaN or Inf",)),
    ],
    ids=["wrong-dtype", "wrong-rank", "wrong-static-dim", "nan", "inf"],
)
def test_sample_that_does_not_fit(run_cli, tiny_cnn, tmp_path, array, fragments):
    folder = testing.write_samples(tmp_path / "data", [{"input": array}])
    out = tmp_path / "c.json"
    result = run_cli("calibrate", tiny_cnn, "--data", folder, "-o", out)
    _assert_clean_failure(result, out, "s00000.npy", "'input'", *fragments)


def test_npz_missing_an_input(run_cli, tmp_path):
    model = testing.two_inputs()
    path = testing.save(model, tmp_path / "two.onnx")
    folder = tmp_path / "npz"
    folder.mkdir()
    np.savez(folder / "s0.npz", a=np.zeros((1, 8), np.float32))
    out = tmp_path / "c.json"
    result = run_cli("calibrate", path, "--data", folder, "-o", out)
    _assert_clean_failure(result, out, "s0.npz", "no array for input 'b'", "holds a")


def test_samples_zero(run_cli, tiny_cnn, tmp_path):
    out = tmp_path / "c.json"
    result = run_cli(
        "calibrate", tiny_cnn, "--data", tmp_path / "calib", "-o", out, "--samples", "0"
    )
    _assert_clean_failure(result, out, "--samples 0", "at least 1")


def test_calibration_file_of_another_model(run_cli, tiny_cnn, tmp_path, calibrated):
    other = testing.save(testing.conv_bn_relu(seed=1), tmp_path / "other.onnx")
    out = tmp_path / "out.onnx"
    result = run_cli("quantize", other, "--calib", calibrated, "-o", out)
    _assert_clean_failure(
        result, out, "model.calib.json", "made for another model", "other.onnx"
    )


@pytest.mark.parametrize(
    ("damage", "fragments"),
    [
        (lambda text: text[: len(text) // 2], ("truncated or corrupt",)),
        (lambda text: "\x00\x01garbage" + text, ("truncated or corrupt",)),
        (
            lambda text: text.replace('"version": 1', '"version": 7'),
            ("format version 7", "reads version 1"),
        ),
        (
            lambda text: text.replace('"qconvert-calibration"', '"something-else"'),
            ("is not a qconvert calibration file",),
        ),
        (
            lambda text: text.replace('"bin_exponent"', '"exponent"', 1),
            ("is corrupt", "'bin_exponent' is missing"),
        ),
        (
            lambda text: text.replace('"bins": [', '"bins": [-5, ', 1),
            ("is corrupt", "not counts"),
        ),
        (
            lambda text: text.replace('"first_bin": 0,', '"first_bin": 5,', 1),
            ("is corrupt", "do not match its range"),
        ),
    ],
    ids=[
        "truncated",
        "garbage",
        "future-version",
        "not-calibration",
        "missing-field",
        "bad-bins",
        "bins-off-range",
    ],
)
def test_damaged_calibration_file(run_cli, tiny_cnn, tmp_path, calibrated, damage, fragments):
    broken = tmp_path / "broken.json"
    broken.write_text(damage(calibrated.read_text()))
    out = tmp_path / "out.onnx"
    result = run_cli("quantize", tiny_cnn, "--calib", broken, "-o", out)
    _assert_clean_failure(result, out, "broken.json", *fragments)


def test_merge_of_files_from_different_models(run_cli, tiny_cnn, tmp_path, calibrated):
    other = testing.save(testing.conv_bn_relu(seed=2), tmp_path / "other.onnx")
    other_calib = tmp_path / "other.calib.json"
    assert (
        run_cli("calibrate", other, "--data", tmp_path / "calib", "-o", other_calib).code == 0
    )
    out = tmp_path / "merged.json"
    result = run_cli("calibrate", "--merge", calibrated, other_calib, "-o", out)
    _assert_clean_failure(result, out, "Cannot merge", "different models")


def test_merge_of_a_corrupt_file(run_cli, tmp_path, calibrated):
    broken = tmp_path / "broken.json"
    broken.write_text(calibrated.read_text()[:100])
    out = tmp_path / "merged.json"
    result = run_cli("calibrate", "--merge", calibrated, broken, "-o", out)
    _assert_clean_failure(result, out, "broken.json", "truncated or corrupt")


def test_merge_needs_an_output(run_cli, calibrated):
    result = run_cli("calibrate", "--merge", calibrated, calibrated)
    assert result.code == 2
    assert "-o" in result.err


def test_existing_output_is_kept_without_force(run_cli, tiny_cnn, tmp_path):
    out = tmp_path / "c.json"
    out.write_text("precious")
    result = run_cli("calibrate", tiny_cnn, "--data", tmp_path / "calib", "-o", out)
    assert result.code == 3
    assert "already exists" in result.err
    assert out.read_text() == "precious"


def test_onnx_model_is_never_modified(run_cli, tiny_cnn, tmp_path):
    before = tiny_cnn.read_bytes()
    assert (
        run_cli(
            "calibrate", tiny_cnn, "--data", tmp_path / "calib", "-o", tmp_path / "c.json"
        ).code
        == 0
    )
    assert tiny_cnn.read_bytes() == before
    onnx.checker.check_model(str(tiny_cnn))


def test_data_and_calib_together_is_a_usage_error(run_cli, tiny_cnn, tmp_path, calibrated):
    out = tmp_path / "out.onnx"
    result = run_cli(
        "quantize", tiny_cnn, "--data", tmp_path / "calib", "--calib", calibrated, "-o", out
    )
    assert result.code == 2
    assert "--data or --calib" in result.err
    assert not out.exists()


def test_api_calibrate_returns_statistics_without_writing(tiny_cnn, tmp_path):
    import qconvert

    before = set(tmp_path.iterdir())
    calibration = qconvert.calibrate(tiny_cnn, tmp_path / "calib", samples=8, seed=1)
    assert calibration.samples == 8
    assert set(tmp_path.iterdir()) == before
    ranges = derive_ranges(calibration.observers, RangeMethod(name="entropy"))
    assert ranges["relu"].min == 0.0 and ranges["relu"].max > 0
