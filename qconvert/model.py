"""Loading and saving ONNX models.

Loading checks the file before anything else sees it: it exists, it is ONNX, it passes the
ONNX checker. Saving is atomic: the model is written to a temporary file beside the target
and renamed into place, so an interrupted or failed run never leaves a partial output. The
input file is only ever read.

A model whose weights live in external data (any model over protobuf's 2 GB limit) is
saved the same way: `save_with_external_data` writes the model and its `<name>.data` file
into a temporary folder beside the target, lets the caller verify them there, then renames
the data file and the model into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from qconvert import ops
from qconvert.errors import ModelLoadError, OutputError, UnsupportedModelError

_HASH_CHUNK = 1 << 20
OLDEST_OPSET = 7
"""onnxruntime runs ai.onnx opset 7 and later; older models are refused, not upgraded."""


def load_model(path: str | os.PathLike[str]) -> ir.Model:
    """Reads and checks the model at `path`.

    Raises:
        ModelLoadError: the file is missing, is not an ONNX model, is truncated, or fails the
            ONNX checker.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"Model file '{path}' does not exist.")
    if not path.is_file():
        raise ModelLoadError(f"Model path '{path}' is not a file.")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise ModelLoadError(
            f"Model file '{path}' is not a readable ONNX model ({_first_line(exc)})."
        ) from None
    if not proto.graph.node and not proto.graph.output:
        raise ModelLoadError(f"Model file '{path}' is not an ONNX model (it holds no graph).")
    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(
            f"Model file '{path}' fails the ONNX checker: {_first_line(exc)}"
        ) from None
    try:
        return ir.load(path)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise ModelLoadError(
            f"Model file '{path}' could not be read: {_first_line(exc)}"
        ) from None


def check_convertible(model: ir.Model, path: str | os.PathLike[str]) -> None:
    """Refuses models qconvert cannot convert: already quantized, not float32, too old.

    Raises:
        UnsupportedModelError: naming the file and the reason.
    """
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    marker = next((n for n in nodes if n.op_type in ops.QUANTIZED_MARKERS), None)
    if marker is not None:
        raise UnsupportedModelError(
            f"Model '{path}' is already quantized (it holds {marker.op_type} node "
            f"'{marker.name}'); quantizing it again would compound the error.",
            hint="start from the float model.",
        )
    values = [*model.graph.inputs, *model.graph.outputs, *model.graph.initializers.values()]
    values += [out for node in nodes for out in node.outputs]
    dtypes = {value.dtype for value in values if value.dtype is not None}
    if ir.DataType.FLOAT not in dtypes:
        found = ", ".join(sorted(d.name.lower() for d in dtypes)) or "none"
        raise UnsupportedModelError(
            f"Model '{path}' has no float32 tensors (types found: {found}); qconvert "
            "converts float32 models."
        )
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", OLDEST_OPSET))
    if opset < OLDEST_OPSET:
        raise UnsupportedModelError(
            f"Model '{path}' uses ai.onnx opset {opset}, too old to upgrade: qconvert and "
            f"onnxruntime start at opset {OLDEST_OPSET}.",
            hint="export the model again with a newer opset.",
        )


def fingerprint(path: str | os.PathLike[str]) -> str:
    """Returns the SHA-256 of the model file, to tie calibration files and reports to it."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_size(path: str | os.PathLike[str]) -> int:
    """Returns the bytes a model occupies on disk, its external-data files included."""
    path = Path(path)
    total = path.stat().st_size
    proto = onnx.load_model(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in _all_initializers(proto.graph)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return total + sum((path.parent / loc).stat().st_size for loc in locations)


def uses_external_data(path: str | os.PathLike[str]) -> bool:
    """True when some tensor of the model file lives in an external data file."""
    proto = onnx.load_model(str(path), load_external_data=False)
    return any(
        tensor.data_location == onnx.TensorProto.EXTERNAL
        for tensor in _all_initializers(proto.graph)
    )


# Below this many bytes of tensors, a model is read fully into memory, so it can be
# serialized as one protobuf (which cannot exceed 2 GB) for onnxruntime and the checker.
INLINE_LIMIT = 1_500_000_000


def load_external_tensors(model: ir.Model) -> bool:
    """Reads external tensors into memory when the whole model fits in one protobuf.

    Returns:
        True when the model now holds all its tensors; False when it is too large and
        keeps reading them from its external data file.
    """
    total = sum(
        value.const_value.nbytes
        for value in model.graph.initializers.values()
        if value.const_value is not None
    )
    if total > INLINE_LIMIT:
        return False
    ir.external_data.load_to_model(model)
    return True


def save_with_external_data(
    model: ir.Model, path: Path, *, verify: Callable[[str], None]
) -> None:
    """Writes `model` to `path` and its tensors to `<path name>.data` beside it, atomically.

    Both files are first written into a temporary folder beside `path` and `verify` is
    called with the temporary model's path; only then the data file, and after it the
    model, are renamed into place. A failure removes the temporary folder and leaves any
    existing output untouched.
    """
    data_name = f"{path.name}.data"
    folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        staged = folder / path.name
        try:
            ir.save(model, staged, external_data=data_name)
        except OSError as exc:
            raise OutputError(f"Could not write '{path}': {exc.strerror or exc}.") from None
        verify(str(staged))
        try:
            os.replace(folder / data_name, path.parent / data_name)
            os.replace(staged, path)
        except OSError as exc:
            raise OutputError(f"Could not write '{path}': {exc.strerror or exc}.") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check_output_path(path: str | os.PathLike[str], *, force: bool) -> Path:
    """Fails early, before any work, if `path` cannot be written.

    Raises:
        OutputError: the file exists and `force` is off, or its folder does not exist.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputError(
            f"Output file '{path}' already exists.", hint="pass --force to overwrite it."
        )
    if not path.parent.is_dir():
        raise OutputError(f"Output folder '{path.parent}' does not exist.")
    return path


def to_bytes(model: ir.Model) -> bytes:
    """Serializes a model held in memory (all tensors inline)."""
    return ir.serde.serialize_model(model).SerializeToString()


def save_model(model: ir.Model, path: str | os.PathLike[str], *, force: bool) -> Path:
    """Writes `model` to `path` atomically: a temporary file beside it, then a rename."""
    path = check_output_path(path, force=force)
    write_atomically(path, to_bytes(model))
    return path


def write_atomically(path: Path, data: bytes) -> None:
    """Writes `data` to `path` so that readers see either the old file or the whole new one."""
    handle, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise OutputError(f"Could not write '{path}': {exc.strerror or exc}.") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _all_initializers(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_initializers(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _all_initializers(subgraph)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
