"""Run the float model in onnxruntime and stream chosen tensors into observers.

Speed is the point here: calibration should cost about one float inference pass. So:

1. One session, set up once, with exactly the calibrated tensors added as graph outputs
   (graph inputs are read from the feeds instead).
2. Outputs are bound (io binding) to preallocated buffers: onnxruntime writes each tensor
   straight into its slot of a chunk buffer, with no allocation and no copy per run.
3. Statistics are updated once per chunk of runs (up to `chunk_bytes` of activations), not
   once per sample, so the Python overhead per tensor is paid rarely. Memory is bounded by
   the chunk, whatever the number of samples.
4. Min and max see every value. The histogram sees every value of small tensors and a fixed
   stride of large ones (at most `histogram_values` values per sample and tensor, stride
   odd so it does not alias with power-of-two dims): histogramming costs a few ns a value,
   more than the inference of small models, and percentile/entropy/mse need the shape of the
   distribution, not every value. The stride depends only on the tensor's size in one run,
   so a given data set and batch size give the same statistics however it is split.
5. With `batch_size` > 1, consecutive samples of the same shape are concatenated along the
   batch axis; samples whose dynamic dims differ run in separate batches. A batch never
   crosses a multiple of `batch_size` samples, so any contiguous part of the data that
   starts at such a multiple runs in the very batches one pass over all of it runs: the
   base of exact parallel calibration (`parallel`).
6. The session runs onnxruntime's full graph optimizations (constant folding, fusions,
   the NCHWc convolution layout) on the model with every calibrated tensor exposed: a
   float pass gets them too, and they make the runs of the bench's 224 MobileNetV2 about
   1.6x cheaper (in CPU time, every tensor exposed). Fusions only happen around tensors
   that are not graph outputs, so the kernels that compute a given tensor depend on which
   other tensors are exposed. That set is therefore fixed: always all calibrated tensors,
   in every process.
7. `tensors_per_pass` bounds memory on big graphs: every tensor made a graph output stays
   alive for the whole run, so K tensors at a time are exposed, one pass over the data
   each. So that a tensor's statistics do not depend on which others share its pass, the
   graph is optimized once with all of them exposed (6), saved, and each pass runs that
   optimized graph as it is (no further optimization), with only its group of K kept as
   outputs: the same kernels compute the same values.
8. One intra-op thread by default: a kernel's last bits can depend on the thread count
   (MLAS cuts a GEMM into blocks by thread), and every process of a split calibration
   must compute the same values (`parallel`). (Measured: with the optimizations, 1, 2 and
   4 threads gave identical tensors on the sample models and the 224 MobileNetV2; without
   them, digits_cnn differed at 2 threads and the MobileNetV2 at 4. Not a guarantee, and
   on a loaded 2-core machine 2 threads ran 1.4x slower.) The second core is not idle: the
   statistics of one chunk are folded in on a background thread while onnxruntime fills
   the next chunk (`_Folder`).
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from qconvert import ops
from qconvert.calibration.observers import NonFiniteError, TensorObserver, TensorRange
from qconvert.calibration.subgraphs import expose_body_tensors
from qconvert.dataset import Feeds, Sample
from qconvert.errors import CalibrationDataError, ConfigError, ModelLoadError
from qconvert.graph_utils import HOLDERS, body_nodes
from qconvert.runtime import describe_error, make_session

logger = logging.getLogger("qconvert")

_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE}
_INVOLVED_OPS = set(ops.QUANTIZED) | ops.PASS_THROUGH | ops.CLAMPS
_MAX_SLOTS = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectSettings:
    """How calibration runs.

    Attributes:
        batch_size: samples per onnxruntime run (the model's batch dim must be dynamic).
        histogram_values: most values per sample and tensor that go into the histogram
            (0: no histogram, for minmax alone).
        chunk_bytes: activations buffered before statistics are updated.
        threads: onnxruntime's intra-op threads per session (0: its default, one per
            physical core). One by default: a kernel's last bits can depend on the
            thread count (MLAS cuts a GEMM into blocks by thread), so every process of a
            split calibration must use the same setting.
        tensors_per_pass: most tensors exposed in one pass over the data (None: all).
        fold_in_background: fold the statistics of a chunk in on a second thread while
            onnxruntime runs the next (one more core at work). Workers of a split
            calibration fold in line instead: N workers, N busy threads.
    """

    batch_size: int = 1
    histogram_values: int = 1024
    chunk_bytes: int = 4 << 20
    threads: int = 1
    tensors_per_pass: int | None = None
    fold_in_background: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"Batch size {self.batch_size} must be at least 1.")
        if self.histogram_values < 0:
            raise ConfigError("histogram_values must not be negative.")
        if self.threads < 0:
            raise ConfigError(f"threads {self.threads} must not be negative.")
        if self.tensors_per_pass is not None and self.tensors_per_pass < 1:
            raise ConfigError(
                f"--tensors-per-pass {self.tensors_per_pass} must be at least 1."
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class SerializedModel:
    """A model as bytes, with the little `collect_statistics` needs to expose its tensors.

    What calibration workers get: adding graph outputs to the parsed protobuf costs a
    fraction of a round trip through onnx_ir, and every worker pays it before its first
    sample.

    Attributes:
        data: the serialized model.
        inputs: the names of its graph inputs.
        outputs: the names of its graph outputs.
        dtypes: the element type (an onnx TensorProto type) of each tensor to calibrate.
    """

    data: bytes
    inputs: frozenset[str]
    outputs: frozenset[str]
    dtypes: Mapping[str, int]

    @classmethod
    def of(cls, model: ir.Model, tensor_names: Iterable[str]) -> SerializedModel:
        """`model` serialized, ready to expose any of `tensor_names`."""
        dtypes = _dtypes(model)
        return cls(
            data=ir.serde.serialize_model(model).SerializeToString(),
            inputs=frozenset(value.name for value in model.graph.inputs),
            outputs=frozenset(value.name for value in model.graph.outputs),
            dtypes={name: dtypes.get(name, int(ir.DataType.FLOAT)) for name in tensor_names},
        )


def tensors_to_calibrate(model: ir.Model) -> tuple[str, ...]:
    """Names of the float activations that any scheme might quantize.

    These are the non-constant inputs and outputs of every node whose op type the policy
    table knows, in the main graph and in the bodies of its If/Loop/Scan nodes (passed out
    of their holder when exposed, see `subgraphs`). Calibrating all of them once lets one
    calibration serve every scheme and every exclusion.
    """
    names: dict[str, None] = {}
    nodes = list(model.graph)
    for holder in model.graph:
        if holder.op_type in HOLDERS:
            nodes += body_nodes(holder)
    for node in nodes:
        if node.op_type not in _INVOLVED_OPS:
            continue
        for value in (*node.inputs, *node.outputs):
            if value is None or not value.name or value.const_value is not None:
                continue
            if value.dtype is not None and value.dtype not in _FLOAT_TYPES:
                continue
            names[value.name] = None
    return tuple(names)


def checked_body_tensors(
    model: ir.Model, tensor_names: Iterable[str], sample: Sample
) -> tuple[str, ...]:
    """`tensor_names`, less those inside If/Loop/Scan bodies if they cannot be passed out.

    A Loop body tensor whose shape changes from one iteration to the next cannot be
    stacked over the iterations; onnxruntime then refuses the run. One run on `sample`
    tells; without the body tensors the nodes there stay float, and a warning says so.
    """
    names = tuple(tensor_names)
    main = {value.name for value in model.graph.inputs}
    main.update(value.name for node in model.graph for value in node.outputs)
    inside = tuple(name for name in names if name not in main)
    if not inside:
        return names
    try:
        session = make_session(_expose(model, inside), threads=1, optimize=False, quiet=True)
        session.run(list(inside), sample.feeds)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class
        logger.warning(
            "The tensors inside If/Loop/Scan bodies cannot be passed out for calibration "
            "(%s); the nodes there stay float.",
            describe_error(exc),
        )
        return tuple(name for name in names if name in main)
    return names


def collect_statistics(
    model: ir.Model | SerializedModel,
    samples: Iterable[Sample],
    tensor_names: Iterable[str],
    *,
    settings: CollectSettings = CollectSettings(),
    on_sample: Callable[[], None] | None = None,
) -> dict[str, TensorObserver]:
    """Streams `samples` through `model`; returns the statistics of each named tensor.

    With `settings.tensors_per_pass`, `samples` is iterated once per group of tensors, so
    it must be re-iterable (a `DirectorySource` or a list), and `on_sample` is called once
    per sample and pass.
    """
    tensor_names = tuple(tensor_names)
    inputs, originals = _interface(model)
    exposed = tuple(name for name in tensor_names if name not in inputs)
    exposing = _expose(model, exposed)
    per_pass = settings.tensors_per_pass or max(1, len(tensor_names))
    if per_pass < len(tensor_names):
        exposing = _optimized(exposing, settings.threads)
    observers: dict[str, TensorObserver] = {}
    # One pass even with no tensor: the samples are still read and checked.
    for start in range(0, max(1, len(tensor_names)), per_pass):
        group = tensor_names[start : start + per_pass]
        if per_pass < len(tensor_names):
            dropped = set(exposed) - set(group) - originals
            session = _session(_without_outputs(exposing, dropped), settings.threads, False)
        else:
            session = _session(exposing, settings.threads, True)
        observers |= _collect_pass(session, inputs, samples, group, settings, on_sample)
    return observers


def pass_count(tensor_count: int, settings: CollectSettings) -> int:
    """How many passes over the data `collect_statistics` makes for this many tensors."""
    if settings.tensors_per_pass is None or tensor_count == 0:
        return 1
    return -(-tensor_count // settings.tensors_per_pass)


def _collect_pass(
    session,
    inputs: frozenset[str],
    samples: Iterable[Sample],
    tensor_names: tuple[str, ...],
    settings: CollectSettings,
    on_sample: Callable[[], None] | None,
) -> dict[str, TensorObserver]:
    fed = tuple(name for name in tensor_names if name in inputs)
    exposed = tuple(name for name in tensor_names if name not in inputs)
    observers = {name: TensorObserver() for name in tensor_names}
    with _Folder(observers, settings) as folder:
        chunk: _Chunk | None = None
        spare: _Chunk | None = None  # the chunk of the same signature being folded in
        for batch in _batches(samples, settings.batch_size):
            ran = False
            if chunk is not None and chunk.signature == _signature(batch.feeds):
                if chunk.full:
                    folder.fold(chunk)
                    chunk, spare = spare if spare is not None else chunk.twin(), chunk
                ran = chunk.run(batch)
            if not ran:
                # A new input signature, or an output whose shape depends on the data
                # (NonZero, TopK, ...): a plain run tells the shapes to allocate, or
                # reports the failure.
                if chunk is not None:
                    folder.fold(chunk)
                    folder.wait()  # then the old buffers can go
                first = [batch.feeds[name] for name in fed] + _run(session, exposed, batch)
                chunk, spare = _Chunk(session, fed, exposed, first, batch, settings), None
            if on_sample is not None:
                for _ in range(batch.count):
                    on_sample()
        if chunk is not None:
            folder.fold(chunk)
    return observers


class _Folder:
    """Folds full chunks into the observers, in order, on one background thread or in line.

    numpy's reductions release the GIL, as onnxruntime's runs do, so on the thread the
    statistics of one chunk are computed while onnxruntime fills the next: on two cores,
    calibration then costs about the larger of the two instead of their sum. The observers
    see the chunks in the same order either way, so the statistics are the same.
    """

    def __init__(
        self, observers: dict[str, TensorObserver], settings: CollectSettings
    ) -> None:
        self.observers = observers
        self.histogram_values = settings.histogram_values
        self.pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="qconvert-fold")
            if settings.fold_in_background
            else None
        )
        self.pending: Future | None = None

    def fold(self, chunk: _Chunk) -> None:
        """Waits for the previous chunk, then starts folding `chunk` in (or folds it)."""
        self.wait()
        if self.pool is None:
            chunk.flush(self.observers, self.histogram_values)
            return
        self.pending = self.pool.submit(chunk.flush, self.observers, self.histogram_values)

    def wait(self) -> None:
        """Waits for the chunk being folded in; raises what folding it raised."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> _Folder:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if kind is None:
                self.wait()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)


def calibrate_tensors(
    model: ir.Model,
    samples: Iterable[Sample],
    tensor_names: Iterable[str],
    *,
    on_sample: Callable[[], None] | None = None,
) -> dict[str, TensorRange]:
    """Streams `samples` through `model` and returns the min/max range of each tensor."""
    observers = collect_statistics(model, samples, tensor_names, on_sample=on_sample)
    return {name: observer.finalize() for name, observer in observers.items()}


@dataclass(frozen=True, slots=True)
class _Batch:
    feeds: Feeds
    count: int
    source: str


def _batches(samples: Iterable[Sample], batch_size: int) -> Iterator[_Batch]:
    """Consecutive samples of equal shapes, concatenated along the batch axis.

    A batch ends at every multiple of `batch_size` samples, even after a shorter batch cut
    by a change of shape: the batches of any part that starts at such a multiple are then
    the batches of the whole.
    """
    pending: list[Sample] = []

    def joined() -> _Batch:
        if len(pending) == 1:
            return _Batch(pending[0].feeds, 1, pending[0].source)
        feeds = {
            name: np.concatenate([s.feeds[name] for s in pending]) for name in pending[0].feeds
        }
        return _Batch(
            feeds, len(pending), f"{pending[0].source} (and the next {len(pending) - 1})"
        )

    for position, sample in enumerate(samples, start=1):
        if pending and not _same_shapes(pending[0].feeds, sample.feeds):
            yield joined()
            pending = []
        pending.append(sample)
        if position % batch_size == 0:
            yield joined()
            pending = []
    if pending:
        yield joined()


def _signature(feeds: Feeds) -> tuple:
    return tuple((name, array.shape, array.dtype.str) for name, array in feeds.items())


def _same_shapes(a: Feeds, b: Feeds) -> bool:
    return all(a[name].shape == b[name].shape for name in a)


def _run(session, names: tuple[str, ...], batch: _Batch) -> list[np.ndarray]:
    try:
        return list(session.run(names, batch.feeds)) if names else []
    except Exception as exc:  # noqa: BLE001 -- onnxruntime raises bare RuntimeErrors
        raise CalibrationDataError(
            f"onnxruntime failed on sample '{batch.source}': {describe_error(exc)}"
        ) from None


class _Chunk:
    """Buffers for the runs of one input signature; onnxruntime writes into them directly.

    Slot k of each tensor's buffer holds that tensor's output of the k-th run; each slot has
    its own io binding, made on first use, so a run costs one call and no copy.
    """

    def __init__(
        self,
        session,
        fed: tuple[str, ...],
        exposed: tuple[str, ...],
        first: list[np.ndarray],
        batch: _Batch,
        settings: CollectSettings,
    ) -> None:
        self.session = session
        self.signature = _signature(batch.feeds)
        self.names = fed + exposed
        self.fed = len(fed)
        self.samples_per_run = batch.count
        run_bytes = max(1, sum(array.nbytes for array in first))
        self.slots = max(1, min(_MAX_SLOTS, settings.chunk_bytes // run_bytes))
        # np.empty does not touch memory: slots never used cost nothing.
        self.buffers = [np.empty((self.slots, *a.shape), dtype=a.dtype) for a in first]
        for buffer, array in zip(self.buffers, first, strict=True):
            buffer[0] = array
        # The model's inputs get slots too, bound once: a run then copies its feeds in.
        fed_buffers = dict(zip(fed, self.buffers, strict=False))
        self.inputs = {
            name: fed_buffers.get(name, np.empty((self.slots, *array.shape), array.dtype))
            for name, array in batch.feeds.items()
        }
        self.bindings: list = [None] * self.slots
        self.filled = 1

    @property
    def full(self) -> bool:
        return self.filled == self.slots

    def twin(self) -> _Chunk:
        """An empty chunk of the same layout, filled while this one is folded in."""
        twin = copy.copy(self)
        twin.buffers = [np.empty_like(buffer) for buffer in self.buffers]
        fed_buffers = dict(zip(self.names[: self.fed], twin.buffers, strict=False))
        twin.inputs = {
            name: fed_buffers.get(name, np.empty_like(buffer))
            for name, buffer in self.inputs.items()
        }
        twin.bindings = [None] * self.slots
        twin.filled = 0
        return twin

    def run(self, batch: _Batch) -> bool:
        """Runs `batch` into the next slot; False if its outputs do not fit the slots."""
        slot = self.filled
        for name, buffer in self.inputs.items():
            buffer[slot] = batch.feeds[name]
        self.filled += 1
        if self.fed == len(self.names):
            return True  # only graph inputs are calibrated: nothing to run
        binding = self.bindings[slot]
        if binding is None:
            binding = self._bind(slot)
        try:
            self.session.run_with_iobinding(binding)
        except Exception:  # noqa: BLE001 -- onnxruntime raises bare RuntimeErrors
            self.filled -= 1
            return False
        return True

    def _bind(self, slot: int):
        binding = self.session.io_binding()
        for name, buffer in self.inputs.items():
            view = buffer[slot, ...]  # an array even for a scalar input (If's condition)
            binding.bind_input(
                name, "cpu", 0, view.dtype.type, list(view.shape), view.ctypes.data
            )
        outputs = zip(self.names[self.fed :], self.buffers[self.fed :], strict=True)
        for name, buffer in outputs:
            view = buffer[slot, ...]
            binding.bind_output(
                name, "cpu", 0, view.dtype.type, list(view.shape), view.ctypes.data
            )
        self.bindings[slot] = binding
        return binding

    def flush(self, observers: dict[str, TensorObserver], histogram_values: int) -> None:
        """Folds the filled slots into the observers."""
        budget = histogram_values * self.samples_per_run
        for name, buffer in zip(self.names, self.buffers, strict=True):
            rows = buffer[: self.filled].reshape(self.filled, -1)
            if budget == 0:
                histogram = rows[:0]
            elif rows.shape[1] > budget:
                histogram = rows[:, :: -(-rows.shape[1] // budget) | 1]
            else:
                histogram = None  # every value
            try:
                observers[name].update(rows, histogram)
            except NonFiniteError:
                raise CalibrationDataError(
                    f"Tensor '{name}' took NaN values on the calibration data.",
                    hint="check the data; the float model itself is not finite on it.",
                ) from None
        self.filled = 0


def _interface(model: ir.Model | SerializedModel) -> tuple[frozenset[str], frozenset[str]]:
    """The names of the model's graph inputs and graph outputs."""
    if isinstance(model, SerializedModel):
        return model.inputs, model.outputs
    return (
        frozenset(value.name for value in model.graph.inputs),
        frozenset(value.name for value in model.graph.outputs),
    )


def _dtypes(model: ir.Model) -> dict[str, int]:
    """The element type of every graph input and node output (FLOAT where unknown)."""
    values = (*model.graph.inputs, *(out for node in model.graph for out in node.outputs))
    return {value.name: int(value.dtype or ir.DataType.FLOAT) for value in values}


def _session(model: bytes, threads: int, optimize: bool):
    try:
        # Quiet: a run into slots fails when an output's shape changes, and is handled.
        return make_session(model, threads=threads, optimize=optimize, quiet=True)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class
        raise ModelLoadError(
            f"onnxruntime cannot load the model: {describe_error(exc)}"
        ) from None


def _optimized(model: bytes, threads: int) -> bytes:
    """`model` as onnxruntime optimizes it for this machine, saved as it will run."""
    with tempfile.TemporaryDirectory(prefix="qconvert-calibrate-") as folder:
        path = Path(folder) / "optimized.onnx"
        try:
            make_session(model, threads=threads, quiet=True, optimized_path=path)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class
            raise ModelLoadError(
                f"onnxruntime cannot load the model: {describe_error(exc)}"
            ) from None
        return path.read_bytes()


def _without_outputs(model: bytes, dropped: set[str]) -> bytes:
    """`model` with the graph outputs named in `dropped` removed (the nodes stay)."""
    proto = onnx.load_model_from_string(model)
    kept = [output for output in proto.graph.output if output.name not in dropped]
    del proto.graph.output[:]
    proto.graph.output.extend(kept)
    return proto.SerializeToString()


def _expose(model: ir.Model | SerializedModel, tensor_names: tuple[str, ...]) -> bytes:
    """The model's bytes with `tensor_names` added as graph outputs."""
    if isinstance(model, SerializedModel):
        proto, dtypes = onnx.ModelProto.FromString(model.data), model.dtypes
    else:
        proto, dtypes = ir.serde.serialize_model(model), _dtypes(model)
    expose_body_tensors(proto, tensor_names)
    existing = {output.name for output in proto.graph.output}
    for name in tensor_names:
        if name not in existing:
            # An output needs only its name and element type; onnxruntime infers the shape.
            dtype = dtypes.get(name, int(ir.DataType.FLOAT))
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, dtype, None))
    return proto.SerializeToString()
