"""Run the float model in onnxruntime and stream chosen tensors into observers.

Calibration should cost about one float inference pass, in time and in memory. So:

1. One session, set up on the first batch, on the calibration graph (`graphs`): each
   large calibrated tensor is reduced inside onnxruntime right after the node that
   computes it, to its min, max, size and the strided subset of its values the histogram
   takes; small ones leave whole. A run returns a handful of vectors, whatever the number
   of tensors (`folding` reads them), so no activation outlives its readers and the
   session's memory is a float pass's (measured on a 224x224 inverted-residual CNN: every
   tensor exposed as a graph output held about 180 MB more; see the bench's calibration
   rows), and the Python work per run does not grow with the number of tensors.
2. Min and max see every value. The histogram sees every value of small tensors and a
   fixed stride of large ones (at most `histogram_values` values per sample and tensor,
   stride odd so it does not alias with power-of-two dims): histogramming costs a few ns a
   value, and percentile/entropy/mse need the shape of the distribution, not every value.
   The stride depends only on the tensor's size in one run, so a given data set and batch
   size give the same statistics however it is split. The collector feeds it per input
   signature; the first run of a signature tells the sizes (and runs again if the stride
   it guessed was not that of the sizes, as with outputs whose shape depends on the data).
3. A run whose values are not all finite (its sum says) runs again with the raw tensors
   exposed, and the observers sort the values: infinities carry no range, NaN is an error.
4. With `batch_size` > 1, consecutive samples of the same shape are concatenated along the
   batch axis; samples whose dynamic dims differ run in separate batches. A batch never
   crosses a multiple of `batch_size` samples, so any contiguous part of the data that
   starts at such a multiple runs in the very batches one pass over all of it runs: the
   base of exact parallel calibration (`shards`).
5. The session runs onnxruntime's full graph optimizations (constant folding, fusions,
   the NCHWc convolution layout), as a float pass does. Fusions only happen around
   tensors no other node reads, so the kernels that compute a given tensor depend on which
   other tensors are calibrated: the set is fixed, always all calibrated tensors, in every
   process. `tensors_per_pass` only folds a group of them per pass over the data (the
   graph, and so every value, stays the same). The graph reads all of them but those
   whose statistics follow exactly from another's (a Relu's or Clip's output, a reshape:
   `derived`), a set the model and the tensors fix alike.
6. One intra-op thread per run: a kernel's last bits can depend on the thread count (MLAS
   cuts a GEMM into blocks by thread), and every process of a split calibration must
   compute the same values (`shards`). Cores are used by runs instead:
   `concurrent_runs` batches run at once on the one session (onnxruntime runs are
   thread-safe and each runs on its caller's thread), each exactly as it would run alone,
   so the statistics do not depend on how many run at once. The session's weights are
   shared; each run in flight adds only its own activations.
7. Statistics are folded in once per `fold_runs` runs (one observer update per tensor, not
   per run, `folding`), so the Python cost per tensor is paid rarely; the observers merge
   exactly, so the grouping does not change them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import onnx_ir as ir

from qconvert.calibration import folding, reducing
from qconvert.calibration.graphs import (
    SerializedModel,
    calibration_graph,
    exposed_model,
    model_interface,
    open_session,
)
from qconvert.calibration.observers import NonFiniteError, TensorObserver, TensorRange
from qconvert.dataset import Feeds, Sample
from qconvert.errors import CalibrationDataError, ConfigError
from qconvert.runtime import describe_error

_FOLD_BYTES = 4 << 20
"""Histogram values gathered before the observers take them: a bound on the memory they
hold (a run of a 320x320 detector whose output concatenates boxes and class scores
returns 1.2 MB of them; 64 runs held 75 MB)."""
_UNKNOWN_STRIDE = np.iinfo(np.int64).max  # one value a tensor: a size probe


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectSettings:
    """How calibration runs.

    Attributes:
        batch_size: samples per onnxruntime run (the model's batch dim must be dynamic).
        histogram_values: most values per sample and tensor that go into the histogram
            (0: no histogram, for minmax alone).
        threads: onnxruntime's intra-op threads per session (0: its default, one per
            physical core). One by default: a kernel's last bits can depend on the
            thread count (MLAS cuts a GEMM into blocks by thread), so every process of a
            split calibration must use the same setting.
        tensors_per_pass: most tensors fetched in one pass over the data (None: all).
        concurrent_runs: batches run at once on the one session, each on its own thread
            (one core each): the statistics are the same for any number.
        fold_runs: runs whose reductions are gathered before the observers take them.
    """

    batch_size: int = 1
    histogram_values: int = 1024
    threads: int = 1
    tensors_per_pass: int | None = None
    concurrent_runs: int = 1
    fold_runs: int = 64

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
        if self.concurrent_runs < 1 or self.fold_runs < 1:
            raise ConfigError("concurrent_runs and fold_runs must be at least 1.")


class KeptOutputs:
    """The float model's outputs on the first samples of a calibration run.

    The session runs the float model on every sample anyway; fetching its outputs too
    costs a copy of them, where a scorer of quantized variants (`auto`'s check) would
    otherwise build a float session and run those samples again. Only one-sample runs
    in this process keep them; `runs` holds them by sample position, and is emptied if
    they would pass `MAX_BYTES`.
    """

    MAX_BYTES = 64 << 20
    """The most output bytes kept (16 samples of a 640x640 probability map take 26 MB)."""

    def __init__(self, samples: int) -> None:
        self.samples = samples
        self.names: tuple[str, ...] = ()
        self.runs: dict[int, list[np.ndarray]] = {}
        self.bytes = 0

    def complete(self) -> list[list[np.ndarray]] | None:
        """The outputs of samples 0 to `samples` - 1, in order, or None if any is missing."""
        if not self.samples or any(index not in self.runs for index in range(self.samples)):
            return None
        return [self.runs[index] for index in range(self.samples)]

    def add(self, position: int, outputs: list[np.ndarray]) -> None:
        """Keeps the outputs of the sample at `position` (all dropped past `MAX_BYTES`)."""
        self.bytes += sum(array.nbytes for array in outputs)
        if self.bytes > self.MAX_BYTES:
            self.samples = 0
            self.runs.clear()
            return
        self.runs[position] = outputs


def collect_statistics(
    model: ir.Model | SerializedModel,
    samples: Iterable[Sample],
    tensor_names: Iterable[str],
    *,
    settings: CollectSettings = CollectSettings(),
    on_sample: Callable[[], None] | None = None,
    kept: KeptOutputs | None = None,
) -> dict[str, TensorObserver]:
    """Streams `samples` through `model`; returns the statistics of each named tensor.

    With `settings.tensors_per_pass`, `samples` is iterated once per group of tensors, so
    it must be re-iterable (a `DirectorySource` or a list), and `on_sample` is called once
    per sample and pass. `kept` gets the model's outputs on the first samples.
    """
    tensor_names = tuple(tensor_names)
    runner = _Runner(model, tensor_names, settings)
    runner.kept = kept if settings.batch_size == 1 else None
    per_pass = settings.tensors_per_pass or max(1, len(tensor_names))
    observers: dict[str, TensorObserver] = {}
    # One pass even with no tensor: the samples are still read and checked.
    for start in range(0, max(1, len(tensor_names)), per_pass):
        group = tensor_names[start : start + per_pass]
        observers |= runner.collect(samples, group, on_sample)
    return observers


def pass_count(tensor_count: int, settings: CollectSettings) -> int:
    """How many passes over the data `collect_statistics` makes for this many tensors."""
    if settings.tensors_per_pass is None or tensor_count == 0:
        return 1
    return -(-tensor_count // settings.tensors_per_pass)


class _Runner:
    """One session on the calibration graph, and the raw one for non-finite batches."""

    def __init__(
        self,
        model: ir.Model | SerializedModel,
        tensor_names: tuple[str, ...],
        settings: CollectSettings,
    ) -> None:
        self.model = model
        self.settings = settings
        self.inputs, _ = model_interface(model)
        self.tensors = tensor_names
        self.session = None
        self.reader: folding.RunReader | None = None
        self.opened = not tensor_names  # the session is made on the first batch
        self.raw_session = None  # made when a batch first needs it
        # Per input signature, the strides of the reduced tensors' histogram subsets.
        self.strides: dict[tuple, np.ndarray] = {}
        # Per input signature, the reduced tensors' sizes as shape inference tells them
        # (`_open`), so its first run need not be a size probe.
        self.inferred: dict[tuple, np.ndarray] = {}
        self.kept: KeptOutputs | None = None  # filled on the first pass only
        self.outputs: tuple[str, ...] = ()  # the model's own, set with the session

    def collect(
        self,
        samples: Iterable[Sample],
        group: tuple[str, ...],
        on_sample: Callable[[], None] | None,
    ) -> dict[str, TensorObserver]:
        """The statistics of `group` over one pass on `samples`."""
        observers = {name: TensorObserver() for name in group}
        folded = folding.Folder(self.tensors, observers)
        wanted = set(group)
        in_group = np.array([name in wanted for name in self.tensors], bool)
        concurrent = self.settings.concurrent_runs
        pool = (
            ThreadPoolExecutor(max_workers=concurrent, thread_name_prefix="qconvert-run")
            if concurrent > 1 and group
            else None
        )
        in_flight: deque[tuple[_Batch, np.ndarray | None, Future]] = deque()
        kept, self.kept = self.kept, None
        position = 0  # of the next batch to run
        finished = [0]  # samples whose batch is done: `in_flight` finishes in order

        def finish() -> None:
            batch, steps, future = in_flight.popleft()
            if group and self.session is None:
                self._raw(batch, group, observers)
            elif group:
                self._fold(batch, steps, future, group, in_group, folded, kept, finished[0])
            finished[0] += batch.count
            if on_sample is not None:
                for _ in range(batch.count):
                    on_sample()

        try:
            for batch in _batches(samples, self.settings.batch_size):
                if not self.opened:
                    self._open(batch.feeds)
                    if pool is not None and self.session is None:
                        pool.shutdown()
                        pool = None
                if not group or self.session is None:
                    in_flight.append((batch, None, _done(None)))
                else:
                    known = batch.signature in self.strides
                    if not known:
                        while in_flight:  # the sizes of a new signature come first
                            finish()
                    steps = self._steps(batch)
                    feeds = self._feeds(batch, steps)
                    fetch = self.reader.outputs
                    if kept is not None and position < kept.samples and self.outputs:
                        kept.names = self.outputs
                        fetch = [*fetch, *self.outputs]
                    if pool is not None and known:
                        future = pool.submit(self.session.run, fetch, feeds)
                    else:
                        future = _call(self.session.run, fetch, feeds)
                    in_flight.append((batch, steps, future))
                position += batch.count
                while len(in_flight) > 2 * concurrent or (in_flight and pool is None):
                    finish()
            while in_flight:
                finish()
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        folded.flush()
        return observers

    def _open(self, feeds: Feeds) -> None:
        """Makes the session on the calibration graph built for these feeds' shapes.

        The sizes shape inference tells on them save their signature's size probe
        (`_steps`); no session below `reducing.MIN_OPSET`, where every batch runs raw.
        """
        self.opened = True
        shapes = {name: array.shape for name, array in feeds.items()}
        built = calibration_graph(
            self.model,
            self.tensors,
            shapes,
            histogram=self.settings.histogram_values > 0,
        )
        if built is None:
            return
        if built.sizes is not None:
            self.inferred[_signature(feeds)] = built.sizes
        self.session = open_session(
            built.graph.data, self.settings.threads, True, ordered=True, weights=built.weights
        )
        # The reader needs the graph's outputs, not its bytes.
        self.reader = folding.RunReader(
            replace(built.graph, data=b""), self.tensors, built.derived
        )
        self.outputs = built.outputs

    def _steps(self, batch: _Batch) -> np.ndarray | None:
        """The histogram strides to feed for `batch`.

        For a new signature, those of the sizes shape inference told (`_open`), else size
        probes. The first run of a signature checks them against the sizes it returns and
        runs again with the right ones where they differ (`_fold`), so a guess changes no
        statistic: a right one saves that run (one run in 64 on the bench's 224x224 CNNs).
        """
        if self.reader is None or self.reader.graph.steps is None:
            return None
        known = self.strides.get(batch.signature)
        if known is not None:
            return known
        inferred = self.inferred.get(batch.signature)
        if inferred is not None:
            budget = self.settings.histogram_values * batch.count
            return reducing.strides(inferred, budget)
        return np.full(len(self.reader.graph.reduced), _UNKNOWN_STRIDE, np.int64)

    def _feeds(self, batch: _Batch, steps: np.ndarray | None) -> dict[str, np.ndarray]:
        if steps is None:
            return batch.feeds
        return {**batch.feeds, self.reader.graph.steps: steps}

    def _fold(
        self,
        batch: _Batch,
        steps: np.ndarray | None,
        future: Future,
        group: tuple[str, ...],
        in_group: np.ndarray,
        folded: folding.Folder,
        kept: KeptOutputs | None = None,
        position: int = 0,
    ) -> None:
        """Folds the outputs of one run in; runs again raw what they cannot say.

        Outputs past the reader's are the model's own, for `kept` (sample `position`).
        """
        try:
            outputs = future.result()
        except Exception:  # noqa: BLE001 -- onnxruntime raises bare RuntimeErrors
            # A reduction onnxruntime refused, or the model itself: the raw run tells.
            self._raw(batch, group, folded.observers)
            return
        fetched = len(self.reader.outputs)
        if len(outputs) > fetched:
            if kept is not None:
                kept.add(position, list(outputs[fetched:]))
            outputs = outputs[:fetched]
        budget = self.settings.histogram_values * batch.count
        reader = self.reader
        run = reader.read(outputs, steps, budget)
        signature = batch.signature
        if steps is not None:
            # The layout knows whether `steps` are the strides of these sizes.
            if not run.layout.steps_fit:
                # The first run of a signature (or a size that depends on the data): the
                # strides are those of these sizes, so this batch runs again with them.
                wanted = reducing.strides(run.sizes[reader.reduced_at], budget)
                self.strides[signature] = wanted
                rerun = _Batch(
                    self._feeds(batch, wanted), batch.count, batch.source, signature
                )
                outputs = _run(self.session, reader.outputs, rerun)
                run = reader.read(outputs, wanted, budget)
            elif signature not in self.strides:  # the inferred strides were right
                self.strides[signature] = steps
        elif signature not in self.strides:
            self.strides[signature] = np.zeros(0, np.int64)
        if not np.isfinite(run.checks).all():
            # A NaN or infinity reached an output: the raw run finds the tensors.
            self._raw(batch, group, folded.observers)
            return
        finite = np.isfinite(run.mins) & np.isfinite(run.maxs)
        folded.add(run, in_group & finite)
        odd = in_group & ~finite & (run.sizes > 0)
        if odd.any():
            # Whole tensors hold their values here; reduced ones run again raw.
            for index in np.flatnonzero(odd & reader.whole):
                start, size = run.layout.starts[index], run.sizes[index]
                values = run.values[start : start + size]
                self._update(folded.observers, self.tensors[index], values, budget)
            names = tuple(self.tensors[i] for i in np.flatnonzero(odd & ~reader.whole))
            if names:
                self._raw(batch, names, folded.observers)
        if len(folded.runs) >= self.settings.fold_runs or folded.bytes >= _FOLD_BYTES:
            folded.flush()

    def _raw(self, batch: _Batch, group: tuple[str, ...], observers) -> None:
        """Runs `batch` with the raw tensors of `group` exposed; the observers sort them."""
        exposed = tuple(name for name in self.tensors if name not in self.inputs)
        if self.raw_session is None and exposed:
            self.raw_session = open_session(
                exposed_model(self.model, exposed), self.settings.threads, True
            )
        names = tuple(name for name in group if name not in self.inputs)
        arrays = (
            dict(zip(names, _run(self.raw_session, names, batch), strict=True))
            if names
            else {}
        )
        budget = self.settings.histogram_values * batch.count
        for name in group:
            values = batch.feeds[name] if name in self.inputs else arrays[name]
            self._update(observers, name, values.reshape(-1), budget)

    @staticmethod
    def _update(observers, name: str, flat: np.ndarray, budget: int) -> None:
        """`flat`, every value of tensor `name` in a batch, into its observer."""
        some = flat[:: reducing.stride(flat.size, budget)] if budget else flat[:0]
        try:
            observers[name].update(flat, some)
        except NonFiniteError:
            raise CalibrationDataError(
                f"Tensor '{name}' took NaN values on the calibration data.",
                hint="check the data; the float model itself is not finite on it.",
            ) from None


def _done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _call(function, *args) -> Future:
    """`function(*args)` run now, its result or error in a finished future."""
    future: Future = Future()
    try:
        future.set_result(function(*args))
    except Exception as exc:  # noqa: BLE001 -- handed over with the result
        future.set_exception(exc)
    return future


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
    signature: tuple  # `_signature(feeds)`: read three times a run, made once


def _batches(samples: Iterable[Sample], batch_size: int) -> Iterator[_Batch]:
    """Consecutive samples of equal shapes, concatenated along the batch axis.

    A batch ends at every multiple of `batch_size` samples, even after a shorter batch cut
    by a change of shape: the batches of any part that starts at such a multiple are then
    the batches of the whole.
    """
    pending: list[Sample] = []

    def joined() -> _Batch:
        if len(pending) == 1:
            feeds = pending[0].feeds
            return _Batch(feeds, 1, pending[0].source, _signature(feeds))
        feeds = {
            name: np.concatenate([s.feeds[name] for s in pending]) for name in pending[0].feeds
        }
        return _Batch(
            feeds,
            len(pending),
            f"{pending[0].source} (and the next {len(pending) - 1})",
            _signature(feeds),
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
