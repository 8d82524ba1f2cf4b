"""A reference run kept on disk, so later comparisons need no reference model.

The file is a zip archive (conventionally `.npz`) written one sample at a time, so memory
does not grow with the number of samples:

    s00000/0.npy, s00000/1.npy, ...   output 0, 1, ... of sample 0, in the model's order
    s00001/0.npy, ...
    qconvert-outputs.json            written last: format, version, the model, its size,
                                     the output names and the sample file names in order

It is written to a temporary file beside the target and renamed into place when complete,
so a failed run leaves no partial file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from qconvert.errors import CalibrationDataError, OutputError

FORMAT = "qconvert-outputs"
VERSION = 1
_META = "qconvert-outputs.json"


class OutputsWriter:
    """Appends one sample's outputs at a time; `close()` finishes and renames the file."""

    def __init__(
        self, path: str | os.PathLike[str], *, model: str, model_bytes: int, outputs: list[str]
    ) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise OutputError(f"Outputs folder '{self.path.parent}' does not exist.")
        self.meta = {
            "format": FORMAT,
            "version": VERSION,
            "model": model,
            "model_bytes": model_bytes,
            "outputs": list(outputs),
            "samples": [],
        }
        handle, self._temporary = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
        )
        os.close(handle)
        self._zip = zipfile.ZipFile(self._temporary, "w", zipfile.ZIP_STORED)

    def add(self, sample: str, arrays: list[np.ndarray]) -> None:
        """Stores the outputs of the sample read from file `sample`."""
        index = len(self.meta["samples"])
        for position, array in enumerate(arrays):
            with self._zip.open(f"s{index:05d}/{position}.npy", "w") as stream:
                np.lib.format.write_array(stream, np.asarray(array), allow_pickle=False)
        self.meta["samples"].append(Path(sample).name)

    def close(self) -> None:
        """Writes the index and moves the finished file into place."""
        self._zip.writestr(_META, json.dumps(self.meta, indent=1))
        self._zip.close()
        os.replace(self._temporary, self.path)

    def discard(self) -> None:
        """Removes the unfinished file."""
        with contextlib.suppress(OSError, ValueError):
            self._zip.close()
        with contextlib.suppress(OSError):
            os.unlink(self._temporary)


class SavedOutputs:
    """Reads a file written by `OutputsWriter`, one sample at a time."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CalibrationDataError(f"Saved outputs file '{self.path}' does not exist.")
        try:
            self._zip = zipfile.ZipFile(self.path)
            meta = json.loads(self._zip.read(_META))
        except (zipfile.BadZipFile, KeyError, ValueError, OSError):
            raise CalibrationDataError(
                f"File '{self.path}' is not a saved-outputs file.",
                hint="write one with qconvert compare --save-outputs.",
            ) from None
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise CalibrationDataError(
                f"File '{self.path}' is not a version {VERSION} saved-outputs file."
            )
        self.model: str = meta["model"]
        self.model_bytes: int | None = meta.get("model_bytes")
        self.outputs: list[str] = list(meta["outputs"])
        self.samples: list[str] = list(meta["samples"])

    def read(self, index: int) -> list[np.ndarray]:
        """The outputs of sample `index`, in the saved order."""
        arrays = []
        for position in range(len(self.outputs)):
            name = f"s{index:05d}/{position}.npy"
            try:
                with self._zip.open(name) as stream:
                    arrays.append(np.lib.format.read_array(stream, allow_pickle=False))
            except (KeyError, ValueError, OSError):
                raise CalibrationDataError(
                    f"Saved outputs file '{self.path}' has no readable entry '{name}'."
                ) from None
        return arrays

    def close(self) -> None:
        """Releases the file."""
        self._zip.close()
