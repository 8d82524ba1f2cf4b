"""The float model's weights its prepared copy does not share, read again from its file.

`quantize` keeps the float model through the whole run: a recipe re-runs its stages on it
(equalization is tried on a fresh copy of it), and its prepared copy shares the tensors
preparation left alone. The tensors preparation replaced (a Conv weight with a BatchNorm
folded in) are read again only by a stage that starts over from the float model; held in
memory, they sat under every session the run built: 46 MB on a 224x224 residual CNN whose
every Conv has a BatchNorm folded in.

`read_from_file` makes each such initializer of the main graph an `ir.LazyTensor` that
reads its bytes from the model file each time they are asked for (`os.pread`), and holds
nothing between reads. A tensor the prepared model shares stays held: the stages read it
often, and hand it to onnxruntime as it is. Readers get the same values: a tensor is made
lazy only where the file's bytes are the tensor's (compared once, here), and a read fails
if the file has changed since (`ModelLoadError`). A lazy tensor serializes to the same
fields (name, type, dims, raw data), so written models are the same bytes.

The offsets come from the file's protobuf encoding, walked without parsing the tensors:
the model's graph (field 7), its initializers (field 5), each one's name (8) and raw data
(9). Anything unexpected (a field repeated, a tensor whose bytes differ) leaves that
tensor, or the whole model, as it was.
"""

from __future__ import annotations

import mmap
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qconvert.errors import ModelLoadError
from qconvert.owned_tensors import ARRAY_DTYPES

MIN_BYTES = 1 << 16
"""Smaller initializers stay held: shape constants and biases, read often and worth little."""

_LEN, _VARINT, _FIXED64, _FIXED32 = 2, 0, 1, 5
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_NAME, _TENSOR_RAW_DATA = 7, 5, 8, 9


def read_from_file(
    model: ir.Model, path: str | os.PathLike[str], prepared: ir.Model | None = None
) -> int:
    """Makes `model`'s large initializers read from `path` on demand (see the module).

    `model` was loaded from `path`; those of its tensors that `prepared` (a prepared copy
    of it) holds as initializers stay as they are. Returns how many bytes it no longer
    holds.
    """
    if sys.byteorder != "little" or not hasattr(os, "pread"):  # big-endian hosts, Windows
        return 0
    path = Path(path).resolve()
    spans = initializer_spans(path)
    if not spans:
        return 0
    shared = (
        {id(value.const_value) for value in prepared.graph.initializers.values()}
        if prepared is not None
        else set()
    )
    stamp = _stamp(path)
    released = 0
    with path.open("rb") as file:
        for name, value in model.graph.initializers.items():
            tensor = value.const_value
            if (
                type(tensor) is not ir.Tensor
                or tensor.dtype not in ARRAY_DTYPES
                or tensor.nbytes < MIN_BYTES
                or name not in spans
                or id(tensor) in shared
            ):
                continue
            offset, length = spans[name]
            if length != tensor.nbytes or os.pread(file.fileno(), length, offset) != (
                tensor.tobytes()
            ):
                continue
            span = _Span(path, stamp, offset, length, tensor.dtype, tuple(tensor.shape))
            value.const_value = ir.LazyTensor(
                span.tensor_reader(name), dtype=tensor.dtype, shape=tensor.shape, name=name
            )
            released += length
    return released


@dataclass(frozen=True, slots=True)
class _Span:
    """Where one tensor's raw data lies in the model file, and the file as it was then."""

    path: Path
    stamp: tuple[int, int]
    offset: int
    length: int
    dtype: ir.DataType
    shape: tuple[int, ...]

    def tensor_reader(self, name: str) -> Callable[[], ir.Tensor]:
        def read() -> ir.Tensor:
            return ir.Tensor(self.array(), dtype=self.dtype, name=name)

        return read

    def array(self) -> np.ndarray:
        """The bytes read again, as a read-only array (the tensor's values)."""
        if _stamp(self.path) != self.stamp:
            raise ModelLoadError(
                f"Model file '{self.path}' changed while it was being converted.",
                hint="convert a copy that nothing else writes to.",
            )
        with self.path.open("rb") as file:
            data = os.pread(file.fileno(), self.length, self.offset)
        if len(data) != self.length:
            raise ModelLoadError(f"Model file '{self.path}' was cut short while converting.")
        return np.frombuffer(data, dtype=self.dtype.numpy()).reshape(self.shape)


def _stamp(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_size, status.st_mtime_ns


def initializer_spans(path: str | os.PathLike[str]) -> dict[str, tuple[int, int]]:
    """Each main-graph initializer's raw data as (offset, length) in the file at `path`.

    Initializers without raw data, and names given twice, are left out; so is every
    one where the model or graph field is repeated (protobuf would merge the copies).
    """
    with open(path, "rb") as file:
        if os.fstat(file.fileno()).st_size == 0:
            return {}
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                return _spans(data)
            except IndexError:  # a varint runs past the end: not a model to trust
                return {}


def _spans(data: mmap.mmap) -> dict[str, tuple[int, int]]:
    graphs = [span for field, span in _fields(data, 0, len(data)) if field == _MODEL_GRAPH]
    if len(graphs) != 1:
        return {}
    start, end = graphs[0]
    spans: dict[str, tuple[int, int]] = {}
    repeated: set[str] = set()
    for field, (begin, stop) in _fields(data, start, end):
        if field != _GRAPH_INITIALIZER:
            continue
        name, raw = None, None
        for inner, (at, until) in _fields(data, begin, stop):
            if inner == _TENSOR_NAME:
                name = data[at:until].decode("utf-8", errors="replace")
            elif inner == _TENSOR_RAW_DATA:
                raw = (at, until - at)
        if name is None or raw is None:
            continue
        if name in spans:
            repeated.add(name)
        spans[name] = raw
    return {name: span for name, span in spans.items() if name not in repeated}


def _fields(data: mmap.mmap, start: int, end: int):
    """(field number, (begin, end)) of each length-delimited field in `data[start:end]`.

    Other wire types are stepped over. A malformed message ends the walk.
    """
    at = start
    while at < end:
        key, at = _varint(data, at)
        field, wire = key >> 3, key & 7
        if wire == _LEN:
            length, at = _varint(data, at)
            if at + length > end:
                return
            yield field, (at, at + length)
            at += length
        elif wire == _VARINT:
            _, at = _varint(data, at)
        elif wire == _FIXED64:
            at += 8
        elif wire == _FIXED32:
            at += 4
        else:  # groups: not in ONNX's messages
            return


def _varint(data: mmap.mmap, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
