"""Calibration split over workers: contiguous shards, statistics merged exactly.

The samples are cut into contiguous shards, one per worker. Each worker (a local process
here, a Ray task in `ray_backend`) opens its own onnxruntime session, streams its shard
through `collect_statistics` and returns its observers; the driver merges them, in shard
order, with `TensorObserver.merge`. The merged statistics are bit-identical to one pass
over all samples, so the calibration file is byte-identical:

- min and max are order-free; counts and histogram bins are integers, so their sums are
  exact in any order; the bin layout is a function of [min, max] alone (`observers`).
- Each value a worker computes is the value one process computes: shard boundaries fall on
  multiples of the batch size, and a batch never crosses such a multiple (`collect`), so
  every shard runs exactly the batches of the single pass (same inputs, same kernels), and
  the histogram's sampling stride depends only on the size of one run.
- Every session, in every worker, optimizes the same graph (every calibrated tensor
  exposed, `collect`) and runs on the same number of intra-op threads
  (`CollectSettings.threads`, one by default): onnxruntime's fusions and MLAS's thread
  partitioning can change a tensor's last bits, so neither may differ between a worker
  and the single process. Cores are used by workers, not threads: with N workers on C
  cores, use N = C.

Local workers are started with `spawn` (onnxruntime's thread pools do not survive fork).
A worker sends progress counts and then its observers through one queue; a worker that
dies ends the run with `CalibrationWorkerError`, and nothing is written.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import queue as queue_module
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import onnx_ir as ir

from qconvert.calibration.collect import CollectSettings, collect_statistics, pass_count
from qconvert.calibration.observers import TensorObserver
from qconvert.dataset import DirectorySource, ImagePreprocessing, InputSpec, Sample
from qconvert.errors import CalibrationWorkerError, QconvertError

if TYPE_CHECKING:
    from qconvert.calibration.ray_backend import RayCluster

KILL_SHARD_ENV = "QCONVERT_TEST_KILL_SHARD"
"""Fault injection for the tests: `INDEX` kills the worker of shard INDEX (0-based) halfway
through its samples, on every attempt; `INDEX:MARKER` kills it only while the file MARKER
does not exist, creating it first (so a retried shard succeeds)."""

_REPORT_SECONDS = 0.1  # workers report progress at most this often


@dataclass(frozen=True, slots=True, kw_only=True)
class Shard:
    """Samples `start` to `stop` - 1 of the (selected) data set."""

    index: int
    start: int
    stop: int

    def describe(self) -> str:
        """e.g. `shard 2 (samples 100-199)`."""
        return f"shard {self.index + 1} (samples {self.start}-{self.stop - 1})"


def split(total: int, parts: int, *, batch_size: int = 1) -> tuple[Shard, ...]:
    """`parts` contiguous shards of about equal size, cut at multiples of `batch_size`.

    Fewer shards when there are fewer batches than parts; never an empty shard.
    """
    batches = -(-total // batch_size)
    parts = max(1, min(parts, batches))
    cuts = [min(total, batch_size * (batches * k // parts)) for k in range(parts + 1)]
    return tuple(
        Shard(index=k, start=start, stop=stop)
        for k, (start, stop) in enumerate(itertools.pairwise(cuts))
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class DataSpec:
    """How a worker opens the same samples as the driver: the folder and the selection."""

    folder: str
    specs: tuple[InputSpec, ...]
    images: ImagePreprocessing | None = None
    samples: int | None = None
    seed: int = 0

    def open(self) -> DirectorySource:
        """The selected samples, in the driver's order."""
        source = DirectorySource(self.folder, self.specs, images=self.images)
        if self.samples is not None and self.samples < len(source):
            source = source.subset(self.samples, seed=self.seed)
        return source


@dataclass(frozen=True, slots=True, kw_only=True)
class Work:
    """What every shard computes: the statistics of `tensors` of `model`.

    Attributes:
        model: the prepared float model, serialized (workers get bytes, not objects).
        tensors: the tensors to calibrate, in the file's order.
        settings: batch size, histogram sampling, threads and tensors per pass.
        kill_shard: the test fault injection, read from `KILL_SHARD_ENV` by the driver.
    """

    model: bytes
    tensors: tuple[str, ...]
    settings: CollectSettings
    kill_shard: str | None = None

    def run(
        self, shard: Shard, samples: Iterable[Sample], report: Callable[[int], None]
    ) -> dict[str, TensorObserver]:
        """The statistics of one shard; `report(n)` gets the samples done so far."""
        model = ir.serde.deserialize_model(onnx.load_model_from_string(self.model))
        done = 0
        last = time.monotonic()
        doomed = self._doomed(shard)

        def on_sample() -> None:
            nonlocal done, last
            done += 1
            if time.monotonic() - last >= _REPORT_SECONDS:
                report(done)
                last = time.monotonic()
            if doomed and done == (shard.stop - shard.start + 1) // 2:
                report(done)
                os._exit(17)  # dies without a word, as under the OOM killer

        observers = collect_statistics(
            model, samples, self.tensors, settings=self.settings, on_sample=on_sample
        )
        report(done)
        return observers

    def _doomed(self, shard: Shard) -> bool:
        """Whether the test fault injection kills this attempt at `shard`."""
        if self.kill_shard is None:
            return False
        index, _, marker = self.kill_shard.partition(":")
        if int(index) != shard.index:
            return False
        if marker:
            if Path(marker).exists():
                return False
            Path(marker).touch()
        return True


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardRecord:
    """Where and how fast one shard ran, for the report."""

    shard: Shard
    worker: str
    seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Split:
    """How calibration work was split: the backend, threads, passes and shards."""

    backend: str
    threads: int
    passes: int
    shards: tuple[ShardRecord, ...]

    def describe(self) -> list[str]:
        """One line for the split, then one per shard."""
        if self.threads == 0:
            threads = "onnxruntime's default threads"
        else:
            threads = (
                f"{self.threads} onnxruntime thread{'s' if self.threads > 1 else ''} each"
            )
        passes = f", {self.passes} passes over the data" if self.passes > 1 else ""
        lines = [f"split: {self.backend}, {threads}{passes}"]
        lines += [
            f"  shard {r.shard.index + 1}: samples {r.shard.start}-{r.shard.stop - 1}, "
            f"{r.worker}, {r.seconds:.2f} s"
            for r in self.shards
        ]
        return lines


def merge_shards(
    results: Sequence[Mapping[str, TensorObserver]], tensors: Iterable[str]
) -> dict[str, TensorObserver]:
    """Per tensor, the shards' observers merged in shard order (exact, see above)."""
    merged = {}
    for name in tensors:
        observer = TensorObserver()
        for result in results:
            observer.merge(result[name])
        merged[name] = observer
    return merged


def run_local(
    work: Work,
    data: DataSpec,
    shards: Sequence[Shard],
    advance: Callable[[], None],
) -> tuple[list[dict[str, TensorObserver]], tuple[ShardRecord, ...]]:
    """Runs each shard in its own spawned process; returns results in shard order.

    Raises:
        CalibrationWorkerError: a worker died (killed, out of memory, crashed).
        QconvertError: a worker met bad data; its own error, naming the sample.
    """
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    processes = [
        context.Process(target=_local_worker, args=(work, data, shard, messages), daemon=True)
        for shard in shards
    ]
    results: dict[int, dict[str, TensorObserver]] = {}
    records: dict[int, ShardRecord] = {}
    shown = [0] * len(shards)
    try:
        for process in processes:
            process.start()
        while len(results) < len(shards):
            try:
                kind, index, payload = messages.get(timeout=0.1)
            except queue_module.Empty:
                _check_alive(processes, shards, results)
                continue
            if kind == "progress":
                for _ in range(payload - shown[index]):
                    advance()
                shown[index] = max(shown[index], payload)
            elif kind == "done":
                observers, seconds = payload
                results[index] = observers
                records[index] = ShardRecord(
                    shard=shards[index],
                    worker=f"local process {processes[index].pid}",
                    seconds=seconds,
                )
            elif kind == "error":
                raise payload
            else:  # "bug": an unexpected exception, with the worker's traceback
                raise RuntimeError(f"Calibration worker failed:\n{payload}")
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()
        messages.close()
    return [results[k] for k in range(len(shards))], tuple(
        records[k] for k in range(len(shards))
    )


def _check_alive(
    processes: Sequence, shards: Sequence[Shard], results: Mapping[int, object]
) -> None:
    for process, shard in zip(processes, shards, strict=True):
        if shard.index not in results and process.exitcode not in (None, 0):
            raise CalibrationWorkerError(
                f"The calibration worker of {shard.describe()} died "
                f"(exit code {process.exitcode}); nothing was written.",
                hint="it may have run out of memory: try fewer --workers or "
                "--tensors-per-pass K.",
            )


def _local_worker(work: Work, data: DataSpec, shard: Shard, messages) -> None:
    """A worker process's body: everything it has to say goes through `messages`."""
    start = time.perf_counter()
    try:
        samples = data.open().part(shard.start, shard.stop)
        observers = work.run(
            shard, samples, lambda done: messages.put(("progress", shard.index, done))
        )
        messages.put(("done", shard.index, (observers, time.perf_counter() - start)))
    except QconvertError as exc:
        messages.put(("error", shard.index, exc))
    except Exception:  # noqa: BLE001 - a bug: its traceback goes to the driver
        messages.put(("bug", shard.index, traceback.format_exc()))
    messages.close()
    messages.join_thread()


def collect_split(
    model: ir.Model,
    source: DirectorySource,
    tensors: tuple[str, ...],
    *,
    settings: CollectSettings,
    data: DataSpec,
    workers: int = 1,
    ray: RayCluster | None = None,
    advance: Callable[[], None],
) -> tuple[dict[str, TensorObserver], Split]:
    """The statistics of `tensors` on `source`, in this process, local workers or Ray.

    `data` must open the same samples as `source` (workers re-open the folder). `advance`
    is called once per sample and pass over the data. With `ray`, `workers` > 1 sets the
    number of shards (else one per CPU of the cluster).
    """
    passes = pass_count(len(tensors), settings)
    if ray is None and workers == 1:
        start = time.perf_counter()
        observers = collect_statistics(
            model, source, tensors, settings=settings, on_sample=advance
        )
        record = ShardRecord(
            shard=Shard(index=0, start=0, stop=len(source)),
            worker="this process",
            seconds=time.perf_counter() - start,
        )
        split_ = Split(
            backend="this process", threads=settings.threads, passes=passes, shards=(record,)
        )
        return observers, split_
    work = Work(
        model=ir.serde.serialize_model(model).SerializeToString(),
        tensors=tensors,
        settings=settings,
        kill_shard=os.environ.get(KILL_SHARD_ENV) or None,
    )
    if ray is not None:
        from qconvert.calibration.ray_backend import run_on_ray

        results, records, backend = run_on_ray(
            work,
            data,
            source,
            shards=workers if workers > 1 else None,
            cluster=ray,
            advance=advance,
        )
    else:
        shards = split(len(source), workers, batch_size=settings.batch_size)
        results, records = run_local(work, data, shards, advance)
        backend = f"{len(shards)} local processes"
    merged = merge_shards(results, tensors)
    split_ = Split(backend=backend, threads=settings.threads, passes=passes, shards=records)
    return merged, split_
