"""A full disk or a read-only output folder: one clear line, exit 3, no partial file."""

from __future__ import annotations

import errno
import os
import subprocess
import uuid

import pytest
from conftest import SAMPLES

from qconvert import model as model_io
from qconvert.errors import OutputError

CNN = SAMPLES / "digits_cnn"


@pytest.fixture
def small_tmpfs(tmp_path):
    """Mounts a 64 KiB tmpfs (the quantized sample CNN needs about 160 KiB)."""

    def mount(*options: str):
        target = tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"
        target.mkdir()
        done = subprocess.run(
            [
                "mount",
                "-t",
                "tmpfs",
                "-o",
                ",".join(("size=64k", *options)),
                "tmpfs",
                str(target),
            ],
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"this machine does not allow mounting a tmpfs: {done.stderr!r}")
        mounted.append(target)
        return target

    mounted: list = []
    yield mount
    for target in mounted:
        subprocess.run(["umount", str(target)], check=False)


def _quantize_into(run_cli, folder):
    out = folder / "q.onnx"
    result = run_cli("quantize", CNN / "model.onnx", "--data", CNN / "calib", "-o", out)
    return result, out


def test_disk_full(run_cli, small_tmpfs):
    folder = small_tmpfs()
    result, out = _quantize_into(run_cli, folder)
    assert result.code == 3
    assert result.err.strip() == f"Error: Could not write '{out}': No space left on device."
    assert os.listdir(folder) == []


def test_read_only_output_folder(run_cli, small_tmpfs):
    folder = small_tmpfs("ro")
    result, out = _quantize_into(run_cli, folder)
    assert result.code == 3
    # Refused before any work: the folder is checked when the command starts.
    assert result.err.strip() == f"Error: Could not write '{out}': its folder is not writable."
    assert os.listdir(folder) == []


def test_failed_write_removes_its_temporary_file(tmp_path, monkeypatch):
    """The same guarantee where mounting is not allowed: simulate ENOSPC mid-write."""
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    target = tmp_path / "out.onnx"
    with pytest.raises(OutputError, match="No space left on device"):
        model_io.write_atomically(target, b"x" * 1000)
    assert os.listdir(tmp_path) == []


def test_written_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        target = tmp_path / "out.onnx"
        model_io.write_atomically(target, b"data")
    finally:
        os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o644
