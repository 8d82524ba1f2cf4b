"""Loading and saving ONNX models.

Loading treats the file as untrusted and checks it before anything else sees it, in this
order: it exists and fits protobuf's 2 GB limit; it parses as ONNX (without reading any
external data); every external-data reference stays inside the model's folder (no absolute
path, no `..`, no symlink leading out); no tensor declares more bytes than `LoadLimits`
allow; and it passes the ONNX checker. Only then are weights read.

Saving is atomic: the model is written to a temporary file beside the target and renamed
into place, so an interrupted or failed run never leaves a partial output. The input file
is only ever read.

A model whose weights live in external data (any model over protobuf's 2 GB limit) is
saved the same way: `save_with_external_data` writes the model and its `<name>.data` file
into a temporary folder beside the target, lets the caller verify them there, then renames
the data file and the model into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from qconvert import ops
from qconvert.errors import ConfigError, ModelLoadError, OutputError, UnsupportedModelError
from qconvert.limits import DEFAULT_LIMITS, LoadLimits
from qconvert.owned_tensors import own_tensors

_HASH_CHUNK = 1 << 20
PROTOBUF_LIMIT = 2**31 - 1
INLINE_WEIGHTS_LIMIT = PROTOBUF_LIMIT
"""The most bytes of external weights a model to calibrate is read into memory with: past
it they stay in its data files, and the stages that hand onnxruntime the model as one
protobuf (which cannot pass 2 GB) hand it the graph with references into those files
instead (`runtime.external_weights`)."""
OLDEST_OPSET = 7
"""onnxruntime runs ai.onnx opset 7 and later; older models are upgraded to it (and to the
scheme's opset) with the ONNX version converter before onnxruntime sees them."""


def load_model(
    path: str | os.PathLike[str],
    limits: LoadLimits = DEFAULT_LIMITS,
    *,
    keep_external: bool = False,
    keep_external_past: int | None = None,
) -> ir.Model:
    """Reads and checks the model at `path` (see the module docstring for the checks).

    With `keep_external`, weights in external data stay on disk, read (memory-mapped) only
    when a pass asks for them: models past 2 GB are converted tensor by tensor. With
    `keep_external_past`, they stay there only when they declare more bytes than that.

    Raises:
        ModelLoadError: the file is missing, is not an ONNX model, is truncated, refers to
            data outside its folder, declares a tensor over the limit, or fails the checker.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"Model file '{path}' does not exist.")
    if not path.is_file():
        raise ModelLoadError(f"Model path '{path}' is not a file.")
    if path.stat().st_size > PROTOBUF_LIMIT:
        raise ModelLoadError(
            f"Model file '{path}' is over protobuf's 2 GB limit.",
            hint="models this large must keep their weights in external data files.",
        )
    # The file is parsed once: the checks and onnx_ir read the same protobuf (a second
    # parse cost 42 ms of CPU on a 45 MB ResNet-style CNN, a sixth of loading it). The
    # checker is handed the bytes read for it, and reads the file itself (by path it
    # checks external data against the model's folder) only for a model with external
    # data: reading it again cost 40 ms of CPU on that CNN, a quarter of loading it.
    # onnx_ir's tensors are views of that protobuf until `own_tensors` copies them out
    # and the protobuf is dropped: two copies of the weights at most, as when onnx_ir
    # read the file again (holding the checks' protobuf through a second parse peaked at
    # three: a sentence encoder's 90 MB, 265 MB over the imports against 178).
    proto, checked = _check_protobuf(path, limits)
    try:
        onnx.checker.check_model(checked)
    except (onnx.checker.ValidationError, DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(
            f"Model file '{path}' fails the ONNX checker: {_first_line(exc)}"
        ) from None
    del checked  # the bytes are the protobuf's to hold, if it keeps them
    try:
        model = ir.serde.deserialize_model(proto)
        del proto
        # As `ir.load`: external data is found beside the model file.
        ir.external_data.set_base_dir(model.graph, path.parent)
        # One copy of the weights, owned by the model's tensors: not the parsed file
        # behind them, copied out again at each read (`owned_tensors`).
        own_tensors(model)
        if keep_external or (
            keep_external_past is not None and _external_bytes(model) > keep_external_past
        ):
            return model
        # Weights are held in memory from here on, so the model can be handed to
        # onnxruntime as bytes and saved anywhere without dangling file references.
        return ir.external_data.load_to_model(model)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise ModelLoadError(
            f"Model file '{path}' could not be read: {_first_line(exc)}"
        ) from None


def _check_protobuf(path: Path, limits: LoadLimits) -> tuple[onnx.ModelProto, bytes | str]:
    """The checks that read the protobuf: readable, a graph with outputs, tensor sizes.

    Returns the protobuf (external data not read), for onnx_ir to read the model from,
    and what the ONNX checker is to check: the file's bytes as read, or its path for a
    model with external data, whose references the checker resolves from its folder.
    """
    try:
        data = path.read_bytes()
        proto = onnx.load_model_from_string(data, format="protobuf")
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise ModelLoadError(
            f"Model file '{path}' is not a readable ONNX model ({_first_line(exc)})."
        ) from None
    if not proto.graph.node and not proto.graph.output:
        raise ModelLoadError(f"Model file '{path}' is not an ONNX model (it holds no graph).")
    if not proto.graph.output:
        raise ModelLoadError(f"Model file '{path}' declares no graph outputs.")
    external = False
    for tensor in _all_tensors(proto.graph):
        _check_tensor_size(path, tensor, limits)
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            _check_external_location(path, tensor)
            external = True
    return proto, str(path) if external else data


def check_convertible(model: ir.Model, path: str | os.PathLike[str]) -> None:
    """Refuses models qconvert cannot convert: already quantized, or not float32.

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


def fingerprint(path: str | os.PathLike[str]) -> str:
    """Returns the SHA-256 of the model file, to tie calibration files and reports to it."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint_ahead(path: str | os.PathLike[str]) -> Callable[[], str]:
    """`fingerprint(path)` started now, on a thread of its own; the call returned waits for it.

    hashlib lets go of the GIL while it hashes a chunk, so the hash runs on a core that
    loading and preparing the model (one thread of Python) leave idle: on a 90 MB sentence
    encoder that was about 0.2 s at the end of every `calibrate`. An error (the file gone)
    is raised by the call.
    """
    future: Future[str] = Future()

    def run() -> None:
        try:
            future.set_result(fingerprint(path))
        except BaseException as exc:  # noqa: BLE001 -- handed to whoever asks for it
            future.set_exception(exc)

    threading.Thread(target=run, name="qconvert-fingerprint", daemon=True).start()
    return future.result


def file_size(path: str | os.PathLike[str]) -> int:
    """Returns the bytes a model occupies on disk, its external-data files included."""
    path = Path(path)
    total = path.stat().st_size
    if not _may_name_external_data(path):
        return total
    proto = onnx.load_model(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in _all_tensors(proto.graph)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return total + sum((path.parent / loc).stat().st_size for loc in locations)


def uses_external_data(path: str | os.PathLike[str]) -> bool:
    """True when some tensor of the model file lives in an external data file."""
    if not _may_name_external_data(Path(path)):
        return False
    proto = onnx.load_model(str(path), load_external_data=False)
    return any(
        tensor.data_location == onnx.TensorProto.EXTERNAL
        for tensor in _all_tensors(proto.graph)
    )


_LOCATION_KEY = b"location"


def _may_name_external_data(path: Path) -> bool:
    """False when the file cannot refer to external data: the key `location` is absent.

    Every external-data reference stores the key `location` as plain bytes, so a file without
    them has none, and parsing it (all its weights, for an inline model) is not needed: on a 90
    MB sentence encoder that parse took 125 MB and about 0.3 s, twice per quantize. The file is
    read in chunks, overlapping by the key's length less one.
    """
    overlap = len(_LOCATION_KEY) - 1
    tail = b""
    with open(path, "rb") as stream:
        while chunk := stream.read(_HASH_CHUNK):
            if _LOCATION_KEY in tail + chunk[:overlap] or _LOCATION_KEY in chunk:
                return True
            tail = chunk[-overlap:]
    return False


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


def prefetch(tensors: Iterable[ir.TensorProtocol]) -> None:
    """Asks the kernel to read the external data of `tensors` into its page cache, in turn.

    Returns at once: a background thread issues the requests (`posix_fadvise` WILLNEED),
    so the disk reads the next weight while this process quantizes the current one. The
    page cache is the kernel's, not this process's resident memory. A no-op for tensors
    in memory and where the call does not exist.
    """
    ranges = [
        (str(tensor.path), tensor.offset or 0, tensor.length or 0)
        for tensor in tensors
        if isinstance(tensor, ir.ExternalTensor)
    ]
    if ranges and hasattr(os, "posix_fadvise"):
        threading.Thread(target=_will_need, args=(ranges,), daemon=True).start()


def _will_need(ranges: list[tuple[str, int, int]]) -> None:
    for path, offset, length in ranges:
        try:
            handle = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(handle, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # only a hint
        finally:
            os.close(handle)


def check_output_path(
    path: str | os.PathLike[str],
    *,
    force: bool,
    source: str | os.PathLike[str] | None = None,
) -> Path:
    """Fails early, before any work, if `path` cannot be written.

    `source` is the model being converted: the run reads it again after writing (the
    comparison's float reference, weights read back from the file), so writing over it
    would compare the converted model with itself, and is refused even with `force`.

    Raises:
        OutputError: the file exists and `force` is off, it is `source`, or its folder
            does not exist.
    """
    path = Path(path)
    if source is not None and path.exists() and Path(source).exists():
        if os.path.samefile(path, source):
            raise OutputError(
                f"Output file '{path}' is the input model.",
                hint="write the converted model to another file with -o.",
            )
    if path.exists() and not force:
        raise OutputError(
            f"Output file '{path}' already exists.", hint="pass --force to overwrite it."
        )
    if not path.parent.is_dir():
        raise OutputError(f"Output folder '{path.parent}' does not exist.")
    if not os.access(path.parent, os.W_OK):
        raise OutputError(f"Could not write '{path}': its folder is not writable.")
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
    try:
        handle, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
        )
    except OSError as exc:
        raise OutputError(f"Could not write '{path}': {exc.strerror or exc}.") from None
    try:
        # mkstemp creates the file private (0600); a written model gets the usual umask.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
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


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a graph holds: initializers, Constant-style attributes, subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t
            elif attribute.type == onnx.AttributeProto.TENSORS:
                yield from attribute.tensors
            elif attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _all_tensors(subgraph)


def _external_bytes(model: ir.Model) -> int:
    """The bytes of the model's initializers in external data files (none of them read)."""
    return sum(
        value.const_value.nbytes
        for value in model.graph.initializers.values()
        if isinstance(value.const_value, ir.ExternalTensor)
    )


def _check_tensor_size(path: Path, tensor: onnx.TensorProto, limits: LoadLimits) -> None:
    """The declared size is within limits and matches the data actually stored."""
    if any(dim < 0 for dim in tensor.dims):
        raise ModelLoadError(
            f"Model file '{path}': tensor '{tensor.name}' has a negative dim."
        )
    itemsize = _ELEMENT_BYTES.get(tensor.data_type, 8)
    elements = math.prod(tensor.dims)
    declared = elements * itemsize
    if declared > limits.max_tensor_bytes:
        raise ModelLoadError(
            f"Model file '{path}': tensor '{tensor.name}' declares {declared:,} bytes, over "
            f"the limit of {limits.max_tensor_bytes:,}.",
            hint="raise the limit with --max-tensor-bytes if the machine can hold it.",
        )
    stored = _stored_elements(tensor)
    if stored is not None and stored != elements:
        raise ModelLoadError(
            f"Model file '{path}': tensor '{tensor.name}' declares {elements:,} elements "
            f"but stores {stored:,}."
        )


_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")


def _stored_elements(tensor: onnx.TensorProto) -> int | None:
    """How many elements the tensor really holds, where that can be told.

    None where it cannot be told without reading external data, and for packed or complex
    types.
    """
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    if tensor.data_type not in _ELEMENT_BYTES:
        return None  # packed 4-bit, complex and string tensors are left to the checker
    if tensor.HasField("raw_data"):
        whole, remainder = divmod(len(tensor.raw_data), _ELEMENT_BYTES[tensor.data_type])
        return whole if remainder == 0 else -1
    return sum(len(getattr(tensor, field)) for field in _TYPED_FIELDS)


def _check_external_location(path: Path, tensor: onnx.TensorProto) -> None:
    """Refuses external data that would be read from outside the model's folder."""
    entries = {entry.key: entry.value for entry in tensor.external_data}
    location = entries.get("location", "")
    problem = None
    if not location:
        problem = "has no location"
    elif os.path.isabs(location) or Path(location).drive:
        problem = f"points to the absolute path '{location}'"
    elif ".." in Path(location).parts:
        problem = f"points outside the model's folder ('{location}')"
    else:
        folder = path.parent.resolve()
        target = (path.parent / location).resolve()
        if not target.is_relative_to(folder):
            problem = f"is a link leading outside the model's folder ('{location}')"
        elif not target.is_file():
            problem = f"refers to '{location}', which does not exist"
    if problem is not None:
        raise ModelLoadError(
            f"Model file '{path}': the external data of tensor '{tensor.name}' {problem}.",
            hint="external data files must sit beside the model, named relative to it.",
        )


_ELEMENT_BYTES = {
    onnx.TensorProto.FLOAT: 4,
    onnx.TensorProto.UINT8: 1,
    onnx.TensorProto.INT8: 1,
    onnx.TensorProto.UINT16: 2,
    onnx.TensorProto.INT16: 2,
    onnx.TensorProto.INT32: 4,
    onnx.TensorProto.INT64: 8,
    onnx.TensorProto.BOOL: 1,
    onnx.TensorProto.FLOAT16: 2,
    onnx.TensorProto.DOUBLE: 8,
    onnx.TensorProto.UINT32: 4,
    onnx.TensorProto.UINT64: 8,
    onnx.TensorProto.BFLOAT16: 2,
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def fix_input_shapes(model: ir.Model, shapes: tuple[tuple[str, tuple[int, ...]], ...]) -> None:
    """Gives the named graph inputs the fixed `shapes` (`--input-shape`), in place.

    Raises:
        ConfigError: for an input the model lacks, a different rank, or a dim the model
            already fixes at another size.
    """
    inputs = {value.name: value for value in model.graph.inputs if not value.is_initializer()}
    for name, dims in shapes:
        value = inputs.get(name)
        if value is None:
            raise ConfigError(
                f"--input-shape names input '{name}', which the model does not have.",
                hint=f"its inputs are: {', '.join(inputs) or 'none'}.",
            )
        current = value.shape
        if current is not None:
            if len(current) != len(dims):
                raise ConfigError(
                    f"--input-shape gives input '{name}' {len(dims)} dims; the model gives "
                    f"it {len(current)}."
                )
            for axis, (old, new) in enumerate(zip(current, dims, strict=True)):
                if isinstance(old, int) and old >= 0 and old != new:
                    raise ConfigError(
                        f"--input-shape sets dim {axis} of input '{name}' to {new}; the "
                        f"model fixes it at {old}."
                    )
        value.shape = ir.Shape(dims)
