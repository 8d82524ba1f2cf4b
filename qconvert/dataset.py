"""Reading folders of sample inputs, checked against the model's inputs.

A data folder is read in one of these layouts, recognised in this order:

1. ONNX test data (the model-zoo layout): sub-folders `test_data_set_*`, each one sample
   holding `input_0.pb`, `input_1.pb`, ... (serialized TensorProtos, matched to the model's
   inputs by tensor name, else by position).
2. One sub-folder per input name, each holding one `.npy` per sample; samples are matched
   by file name across the sub-folders.
3. One `NAME.npy` per input holding every sample along a leading batch dim (the layout
   other tools export). Rows are read one at a time from the file, never all at once.
4. One sample a file: `.npy` (one array; single-input models) or `.npz` (one array per
   input, keyed by input name).
5. Images (`.jpg`, `.jpeg`, `.png`) for a model with one image input, with a stated
   preprocessing (`ImagePreprocessing`): resize (or scale the shorter side and centre-crop),
   x = (pixel * scale - mean) / std per channel, RGB or BGR, NCHW or NHWC. Needs Pillow
   (`pip install qconvert[images]`).

`labels.npy` is reserved for labels and never read as a sample. A sample may omit a leading
batch dimension of 1; it is added. Each sample is checked (name, dtype, rank, static dims,
finite values) before it reaches onnxruntime, and an error names the file. Samples are read
lazily, one at a time, so memory does not grow with the size of the folder.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qconvert.errors import CalibrationDataError
from qconvert.images import ImagePreprocessing, ImageReader
from qconvert.limits import DEFAULT_LIMITS, LoadLimits
from qconvert.npy import TooLargeError, read_npy

_log = logging.getLogger(__name__)

LABELS_FILE = "labels.npy"
SAMPLE_SUFFIXES = (".npy", ".npz")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class InputSpec:
    """What the model expects of one input: dims are ints (static) or None (dynamic)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...]

    def describe(self) -> str:
        """The shape as users write it, e.g. `(N,1,16,16)` with N for a dynamic dim."""
        return "(" + ",".join("N" if d is None else str(d) for d in self.dims) + ")"


@dataclass(frozen=True, slots=True)
class Sample:
    """One sample: the file it came from and its feeds, ready for onnxruntime."""

    source: str
    feeds: Feeds


def input_specs(model: ir.Model) -> tuple[InputSpec, ...]:
    """The model's real inputs (initializers listed as inputs are not inputs)."""
    specs = []
    for value in model.graph.inputs:
        if value.is_initializer() or value.const_value is not None:
            continue
        if value.dtype is None:
            raise CalibrationDataError(f"Model input '{value.name}' has no element type.")
        dims: tuple[int | None, ...] = ()
        if value.shape is not None:
            # Some exporters (paddle2onnx) write -1 for a dynamic dim: it is not a size.
            dims = tuple(d if isinstance(d, int) and d >= 0 else None for d in value.shape)
        specs.append(InputSpec(value.name or "", value.dtype.numpy(), dims))
    return tuple(specs)


@dataclass(frozen=True, slots=True)
class _Entry:
    """One sample not yet read: where it comes from, and how to read its arrays."""

    source: str
    read: Callable[[], dict[str, np.ndarray]]


class DirectorySource:
    """The samples of one folder, in a stable order, checked against `specs`."""

    def __init__(
        self,
        folder: str | os.PathLike[str],
        specs: tuple[InputSpec, ...],
        *,
        images: ImagePreprocessing | None = None,
        limits: LoadLimits = DEFAULT_LIMITS,
    ) -> None:
        self.folder = Path(folder)
        self.specs = specs
        if not self.folder.exists():
            raise CalibrationDataError(f"Data folder '{self.folder}' does not exist.")
        if not self.folder.is_dir():
            raise CalibrationDataError(f"Data path '{self.folder}' is not a folder.")
        self.layout, self._entries = _discover(self.folder, specs, images, limits)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Sample]:
        for entry in self._entries:
            yield self._sample(entry)

    def sources(self) -> tuple[str, ...]:
        """Where each sample comes from, in order, without reading them."""
        return tuple(entry.source for entry in self._entries)

    def first(self) -> Sample:
        """The first sample, for smoke runs."""
        return self._sample(self._entries[0])

    def subset(self, count: int, *, seed: int = 0) -> DirectorySource:
        """`count` samples drawn at random (reproducibly from `seed`), in folder order.

        Raises:
            CalibrationDataError: `count` is below 1.
        """
        if count < 1:
            raise CalibrationDataError(
                f"--samples {count} selects no samples; it must be at least 1."
            )
        if count >= len(self):
            if count > len(self):
                _log.warning(
                    "--samples %d: '%s' holds only %d samples; using them all.",
                    count,
                    self.folder,
                    len(self),
                )
            return self
        chosen = np.sort(np.random.default_rng(seed).choice(len(self), count, replace=False))
        subset = copy.copy(self)
        subset._entries = tuple(self._entries[i] for i in chosen)
        return subset

    def part(self, start: int, stop: int) -> DirectorySource:
        """Samples `start` to `stop` - 1, in order: one worker's shard."""
        part = copy.copy(self)
        part._entries = self._entries[start:stop]
        return part

    def select(self, indices: Sequence[int]) -> DirectorySource:
        """The samples at `indices`, in that order: the held-out part of a recipe."""
        chosen = copy.copy(self)
        chosen._entries = tuple(self._entries[i] for i in indices)
        return chosen

    def without(self, indices: Sequence[int]) -> DirectorySource:
        """The samples not at `indices`, in folder order: what a recipe calibrates on."""
        left = set(indices)
        rest = copy.copy(self)
        rest._entries = tuple(e for i, e in enumerate(self._entries) if i not in left)
        return rest

    def _sample(self, entry: _Entry) -> Sample:
        arrays = entry.read()
        return Sample(
            entry.source,
            {spec.name: _checked(entry.source, spec, arrays) for spec in self.specs},
        )


def _discover(
    folder: Path,
    specs: tuple[InputSpec, ...],
    images: ImagePreprocessing | None,
    limits: LoadLimits,
) -> tuple[str, tuple[_Entry, ...]]:
    # One directory listing, whose entries know their type: a stat per file would cost
    # as much as reading a small sample.
    with os.scandir(folder) as listing:
        entries = sorted(listing, key=lambda entry: entry.name)
    folders = [Path(e.path) for e in entries if e.is_dir()]
    children = [Path(e.path) for e in entries if e.is_file()]
    test_sets = [p for p in folders if p.name.startswith("test_data_set_")]
    if test_sets:
        return "onnx-test-data", tuple(_test_data_entry(p, specs) for p in _natural(test_sets))
    names = {spec.name for spec in specs}
    if names and names <= {p.name for p in folders}:
        return "folder-per-input", _per_input_folders(folder, specs, limits)
    files = [
        p for p in children if p.suffix.lower() in SAMPLE_SUFFIXES and p.name != LABELS_FILE
    ]
    stems = {p.stem for p in files if p.suffix.lower() == ".npy"}
    if names and names == stems and len(files) == len(names):
        return "file-per-input", _per_input_files(folder, specs)
    if files:
        if any(p.suffix.lower() == ".npy" for p in files) and len(specs) != 1:
            listed = ", ".join(spec.name for spec in specs)
            raise CalibrationDataError(
                f"Data folder '{folder}' holds .npy files, but the model has "
                f"{len(specs)} inputs ({listed}).",
                hint="use .npz files keyed by input name, or one sub-folder per input.",
            )
        return "file-per-sample", tuple(
            _Entry(str(p), _array_reader(p, specs, limits)) for p in files
        )
    pictures = [p for p in children if p.suffix.lower() in IMAGE_SUFFIXES]
    if pictures:
        reader = ImageReader(folder, specs, images or ImagePreprocessing(), limits)
        return "images", tuple(_Entry(str(p), reader.bind(p)) for p in pictures)
    raise CalibrationDataError(
        f"Data folder '{folder}' holds no samples.",
        hint="put one .npy (single-input models) or .npz (keyed by input name) file per "
        "sample in it, or images, or ONNX test_data_set_* folders.",
    )


def _natural(paths: list[Path]) -> list[Path]:
    """Sorted so that test_data_set_10 follows test_data_set_9."""

    def key(path: Path) -> list:
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]

    return sorted(paths, key=key)


SYNTHETIC = "synthetic zeros"
"""The source name of the sample `synthetic_sample` builds."""


def synthetic_sample(specs: tuple[InputSpec, ...]) -> Sample:
    """Zeros of every input's shape (dynamic dims 1), for smoke runs when no data is given."""
    feeds = {
        spec.name: np.zeros(tuple(1 if d is None else d for d in spec.dims), dtype=spec.dtype)
        for spec in specs
    }
    return Sample(SYNTHETIC, feeds)


def _read_error(path: Path | str, exc: BaseException) -> CalibrationDataError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CalibrationDataError(f"Sample '{path}' could not be read: {text}")


def _array_reader(
    path: Path, specs: tuple[InputSpec, ...], limits: LoadLimits
) -> Callable[[], dict]:
    def read() -> dict[str, np.ndarray]:
        try:
            if path.suffix.lower() == ".npy":
                return {specs[0].name: _read_npy_sample(path, limits)}
            with zipfile.ZipFile(path) as archive:
                _check_unpacked_size(
                    path, sum(m.file_size for m in archive.infolist()), limits
                )
            with np.load(path, allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise _read_error(path, exc) from None

    return read


def _read_npy_sample(path: Path, limits: LoadLimits) -> np.ndarray:
    """One `.npy` sample, refused before reading when it is over the size limit."""
    try:
        return read_npy(path, limits.max_sample_bytes)
    except TooLargeError as exc:
        raise _too_large(path, exc.size, limits) from None
    except (ValueError, OSError, EOFError) as exc:
        raise _read_error(path, exc) from None


def _check_unpacked_size(path: Path, unpacked: int, limits: LoadLimits) -> None:
    """Refuses a sample before reading it when it would unpack to more than the limit."""
    if unpacked > limits.max_sample_bytes:
        raise _too_large(path, unpacked, limits)


def _too_large(path: Path, unpacked: int, limits: LoadLimits) -> CalibrationDataError:
    return CalibrationDataError(
        f"Sample '{path}' unpacks to {unpacked:,} bytes, over the limit of "
        f"{limits.max_sample_bytes:,}.",
        hint="raise the limit with --max-sample-bytes if the machine can hold it.",
    )


def _test_data_entry(folder: Path, specs: tuple[InputSpec, ...]) -> _Entry:
    def read() -> dict[str, np.ndarray]:
        import onnx
        import onnx.numpy_helper
        from google.protobuf.message import DecodeError

        files = _natural([p for p in folder.glob("input_*.pb") if p.is_file()])
        if not files:
            raise CalibrationDataError(
                f"Test data folder '{folder}' holds no input_*.pb files."
            )
        tensors = []
        for path in files:
            tensor = onnx.TensorProto()
            try:
                tensor.ParseFromString(path.read_bytes())
                tensors.append((tensor.name, onnx.numpy_helper.to_array(tensor)))
            except (DecodeError, ValueError, TypeError, OSError) as exc:
                raise _read_error(path, exc) from None
        names = {spec.name for spec in specs}
        if all(name in names for name, _ in tensors):
            return dict(tensors)
        # Unnamed or differently named tensors: input_i is the model's i-th input.
        return {spec.name: array for spec, (_, array) in zip(specs, tensors, strict=False)}

    return _Entry(str(folder), read)


def _per_input_folders(
    folder: Path, specs: tuple[InputSpec, ...], limits: LoadLimits
) -> tuple[_Entry, ...]:
    listings = {}
    for spec in specs:
        sub = folder / spec.name
        listings[spec.name] = sorted(
            p.name for p in sub.iterdir() if p.is_file() and p.suffix.lower() == ".npy"
        )
    first = specs[0].name
    for spec in specs:
        if listings[spec.name] != listings[first]:
            missing = sorted(set(listings[first]) ^ set(listings[spec.name]))
            raise CalibrationDataError(
                f"Sub-folders '{folder / first}' and '{folder / spec.name}' hold different "
                f"sample files (e.g. '{missing[0]}' is in only one).",
                hint="each input's sub-folder needs one .npy per sample, with the same names.",
            )
    if not listings[first]:
        raise CalibrationDataError(f"Data folder '{folder / first}' holds no samples.")

    def entry(name: str) -> _Entry:
        def read() -> dict[str, np.ndarray]:
            arrays = {}
            for spec in specs:
                path = folder / spec.name / name
                arrays[spec.name] = _read_npy_sample(path, limits)
            return arrays

        return _Entry(str(folder / "*" / name), read)

    return tuple(entry(name) for name in listings[first])


def _per_input_files(folder: Path, specs: tuple[InputSpec, ...]) -> tuple[_Entry, ...]:
    rows = {spec.name: _RowFile(folder / f"{spec.name}.npy", spec) for spec in specs}
    counts = {name: row.count for name, row in rows.items()}
    if len(set(counts.values())) != 1:
        listed = ", ".join(f"{name}.npy: {count}" for name, count in counts.items())
        raise CalibrationDataError(
            f"The per-input files in '{folder}' hold different numbers of samples ({listed})."
        )
    count = next(iter(counts.values()))
    if count == 0:
        raise CalibrationDataError(f"Data folder '{folder}' holds no samples.")

    def entry(index: int) -> _Entry:
        def read() -> dict[str, np.ndarray]:
            return {name: row.read(index) for name, row in rows.items()}

        return _Entry(f"{folder} (sample {index})", read)

    return tuple(entry(i) for i in range(count))


class _RowFile:
    """One `.npy` holding samples along its first dim, read one row at a time."""

    def __init__(self, path: Path, spec: InputSpec) -> None:
        self.path = path
        try:
            with open(path, "rb") as stream:
                version = np.lib.format.read_magic(stream)
                if version == (1, 0):
                    header = np.lib.format.read_array_header_1_0(stream)
                else:
                    header = np.lib.format.read_array_header_2_0(stream)
                shape, fortran, dtype = header
                self.offset = stream.tell()
        except (ValueError, OSError, EOFError) as exc:
            raise _read_error(path, exc) from None
        if dtype.hasobject or fortran or len(shape) == 0:
            raise CalibrationDataError(
                f"Sample file '{path}' cannot be read row by row "
                f"(shape {shape}, {'Fortran order' if fortran else dtype}).",
                hint="save it with np.save from a C-ordered numeric array.",
            )
        if spec.dims and len(shape) != len(spec.dims):
            raise CalibrationDataError(
                f"Input '{spec.name}' in '{path}' has rank {len(shape)}; a file per input "
                f"holds every sample along a leading batch dim, so it needs the model's rank "
                f"{len(spec.dims)} {spec.describe()}."
            )
        self.count, self.row_shape, self.dtype = shape[0], (1, *shape[1:]), dtype
        self.row_items = math.prod(shape[1:])

    def read(self, index: int) -> np.ndarray:
        with open(self.path, "rb") as stream:
            stream.seek(self.offset + index * self.row_items * self.dtype.itemsize)
            row = np.fromfile(stream, dtype=self.dtype, count=self.row_items)
        if row.size != self.row_items:
            raise CalibrationDataError(f"Sample file '{self.path}' is truncated.")
        return row.reshape(self.row_shape)


def _checked(source: str, spec: InputSpec, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Returns the array for `spec`, with a batch dim added where the sample omits it."""
    if spec.name not in arrays:
        found = ", ".join(sorted(arrays)) or "nothing"
        raise CalibrationDataError(
            f"Sample '{source}' has no array for input '{spec.name}' (it holds {found})."
        )
    array = arrays[spec.name]
    if array.dtype != spec.dtype:
        raise CalibrationDataError(
            f"Input '{spec.name}' in '{source}' has dtype {array.dtype}; "
            f"the model expects {spec.dtype}.",
            hint=f"convert the data, e.g. array.astype(np.{spec.dtype}).",
        )
    if spec.dims and array.ndim == len(spec.dims) - 1 and spec.dims[0] in (None, 1):
        array = array[np.newaxis]
    found_shape = "(" + ",".join(str(d) for d in array.shape) + ")"
    if spec.dims and array.ndim != len(spec.dims):
        raise CalibrationDataError(
            f"Input '{spec.name}' in '{source}' has shape {found_shape} (rank {array.ndim}); "
            f"the model expects {spec.describe()} (rank {len(spec.dims)})."
        )
    for expected, found in zip(spec.dims, array.shape, strict=False):
        if expected is not None and expected != found:
            raise CalibrationDataError(
                f"Input '{spec.name}' in '{source}' has shape {found_shape}; "
                f"the model expects {spec.describe()}."
            )
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise CalibrationDataError(
            f"Input '{spec.name}' in '{source}' holds NaN or Inf values."
        )
    return array
