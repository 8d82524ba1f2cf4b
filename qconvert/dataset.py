"""Reading folders of sample inputs, checked against the model's inputs.

A data folder holds one sample a file:

- `.npy`: one array, for models with a single input;
- `.npz`: one array per model input, keyed by input name.

`labels.npy` is reserved for labels and never read as a sample. A sample may omit a leading
batch dimension of 1; it is added. Each sample is checked (name, dtype, rank, static dims,
finite values) before it reaches onnxruntime, and an error names the file.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qconvert.errors import CalibrationDataError

LABELS_FILE = "labels.npy"
SAMPLE_SUFFIXES = (".npy", ".npz")

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
            dims = tuple(d if isinstance(d, int) else None for d in value.shape)
        specs.append(InputSpec(value.name or "", value.dtype.numpy(), dims))
    return tuple(specs)


class DirectorySource:
    """The samples of one folder, in sorted file-name order, checked against `specs`."""

    def __init__(self, folder: str | os.PathLike[str], specs: tuple[InputSpec, ...]) -> None:
        self.folder = Path(folder)
        self.specs = specs
        if not self.folder.exists():
            raise CalibrationDataError(f"Data folder '{self.folder}' does not exist.")
        if not self.folder.is_dir():
            raise CalibrationDataError(f"Data path '{self.folder}' is not a folder.")
        self.files = tuple(
            path
            for path in sorted(self.folder.iterdir())
            if path.suffix in SAMPLE_SUFFIXES and path.name != LABELS_FILE and path.is_file()
        )
        if not self.files:
            raise CalibrationDataError(
                f"Data folder '{self.folder}' holds no samples.",
                hint="put one .npy (single-input models) or .npz (keyed by input name) "
                "file per sample in it.",
            )
        if any(path.suffix == ".npy" for path in self.files) and len(specs) != 1:
            names = ", ".join(spec.name for spec in specs)
            raise CalibrationDataError(
                f"Data folder '{self.folder}' holds .npy files, but the model has "
                f"{len(specs)} inputs ({names}).",
                hint="use .npz files keyed by input name.",
            )

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[Sample]:
        for path in self.files:
            yield Sample(str(path), self._read(path))

    def first(self) -> Sample:
        """The first sample, for smoke runs."""
        return next(iter(self))

    def _read(self, path: Path) -> Feeds:
        try:
            if path.suffix == ".npy":
                arrays = {self.specs[0].name: np.load(path, allow_pickle=False)}
            else:
                with np.load(path, allow_pickle=False) as archive:
                    arrays = {key: archive[key] for key in archive.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise CalibrationDataError(
                f"Sample '{path}' could not be read: {str(exc).splitlines()[0]}"
            ) from None
        return {spec.name: _checked(path, spec, arrays) for spec in self.specs}


def _checked(path: Path, spec: InputSpec, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Returns the array for `spec`, with a batch dim added where the sample omits it."""
    if spec.name not in arrays:
        found = ", ".join(sorted(arrays)) or "nothing"
        raise CalibrationDataError(
            f"Sample '{path}' has no array for input '{spec.name}' (it holds {found})."
        )
    array = arrays[spec.name]
    if array.dtype != spec.dtype:
        raise CalibrationDataError(
            f"Input '{spec.name}' in '{path}' has dtype {array.dtype}; "
            f"the model expects {spec.dtype}.",
            hint=f"convert the data, e.g. array.astype(np.{spec.dtype}).",
        )
    if spec.dims and array.ndim == len(spec.dims) - 1 and spec.dims[0] in (None, 1):
        array = array[np.newaxis]
    found_shape = "(" + ",".join(str(d) for d in array.shape) + ")"
    if spec.dims and array.ndim != len(spec.dims):
        raise CalibrationDataError(
            f"Input '{spec.name}' in '{path}' has shape {found_shape} (rank {array.ndim}); "
            f"the model expects {spec.describe()} (rank {len(spec.dims)})."
        )
    for expected, found in zip(spec.dims, array.shape, strict=False):
        if expected is not None and expected != found:
            raise CalibrationDataError(
                f"Input '{spec.name}' in '{path}' has shape {found_shape}; "
                f"the model expects {spec.describe()}."
            )
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise CalibrationDataError(f"Input '{spec.name}' in '{path}' holds NaN or Inf values.")
    return array
