"""What `quantize --recipe fast` no longer does after calibration keeps every output the same.

- The report's sizes come from what the run knows: the float model's file alone when it
  keeps no external data, and the bytes written for the model saved whole. The files are
  not read through again, and the sizes are those on disk, data files included.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qconvert import api, testing
from qconvert import model as model_io


def _on_disk(path: Path) -> int:
    """The model file's bytes plus those of any data file saved beside it."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_report_sizes_are_the_files_on_disk(tmp_path, monkeypatch, external):
    model = testing.conv_bn_relu(channels=16)
    folder = tmp_path / "float"
    folder.mkdir()
    save = testing.save_with_external_data if external else testing.save
    path = save(model, folder / "model.onnx")
    testing.write_samples(
        tmp_path / "calib", [testing.random_inputs(model, seed=i) for i in range(8)]
    )
    scanned: list[Path] = []
    scan = model_io._may_name_external_data
    monkeypatch.setattr(
        model_io, "_may_name_external_data", lambda p: scanned.append(Path(p)) or scan(p)
    )
    out = tmp_path / "q.onnx"
    report = api.quantize(
        path, out, data=tmp_path / "calib", eval_data=tmp_path / "calib", recipe="fast"
    )
    sizes = (_on_disk(path), _on_disk(out))
    assert (
        path.with_name("model.onnx.data").exists(),
        out.with_name("q.onnx.data").exists(),
    ) == (
        external,
        external,
    )
    assert (report.conversion.float_bytes, report.conversion.converted_bytes) == sizes
    assert (report.comparison.reference.bytes, report.comparison.candidate.bytes) == sizes
    if not external:  # the float file is read once for references (at load), the output never
        assert scanned == [path]
