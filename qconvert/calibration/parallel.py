"""Calibration split over workers: this process, local processes or a Ray cluster.

`collect_split` runs the work where the user asked; every way computes the statistics of
one pass over all samples, bit for bit (`shards` says why): every session, in every
worker, optimizes the same graph and runs on the same number of intra-op threads. Cores
are used by workers (or concurrent runs), not intra-op threads: with N workers on C
cores, use N = C.

`--workers auto` (`workers=None`, the default) spawns no process: this process runs one
batch per core at once on its one session (`CollectSettings.concurrent_runs`), each run
single-threaded as in a worker, so the statistics are again those of one pass. A process
per core would cost an interpreter, a model and a session each: on a 224x224
inverted-residual CNN two processes peaked at 763 MB where a float pass takes 169 MB.

Local workers (`run_local`) share the samples dynamically: the data is cut into chunks of
a few batches (at least 16 chunks per worker, at most 32 batches a chunk); worker k starts
with chunk k, then each takes the next untaken chunk whenever it is free, once per pass
over the data. So a worker that started late, sits on a busy core or meets bigger samples
simply takes fewer chunks, and nobody waits at the end for more than one chunk. The driver
process is worker 0: it calibrates from the start, while the other N - 1 processes are
spawned (`spawn`: onnxruntime's thread pools do not survive fork) and import onnxruntime.
Each worker reads its chunks from the data folder itself; samples never travel between
processes, and the model reaches each spawned worker once, serialized. A worker sends
progress counts and then its observers through one queue; a worker that dies ends the run
with `CalibrationWorkerError`, and nothing is written. Ray tasks (`ray_backend`) get one
contiguous shard each instead, which Ray can retry as a unit.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import queue as queue_module
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import onnx_ir as ir

from qconvert.calibration.collect import (
    CollectSettings,
    KeptOutputs,
    collect_statistics,
    pass_count,
)
from qconvert.calibration.observers import TensorObserver
from qconvert.calibration.shards import (
    REPORT_SECONDS,
    DataSpec,
    Shard,
    ShardRecord,
    Split,
    Work,
    WorkerRecord,
    merge_shards,
    split,
)
from qconvert.cpu import usable_cores
from qconvert.dataset import DirectorySource, Sample
from qconvert.errors import CalibrationWorkerError, QconvertError

if TYPE_CHECKING:
    from qconvert.calibration.ray_backend import RayCluster

_log = logging.getLogger(__name__)

CHUNKS_PER_WORKER = 16
"""Chunks a local run cuts per worker, at least: enough that the last chunks even out who
finishes when, few enough that taking one costs nothing next to calibrating it."""

MAX_CHUNK_BATCHES = 32
"""The most batches in one chunk: on a big data set, how long the others may wait for the
last chunk stays bounded (about a second on an 18-layer residual CNN at 224x224)."""

MAX_AUTO_WORKERS = 8
"""The most batches `--workers auto` runs at once: each holds a run's activations."""


def chunk(total: int, workers: int, *, batch_size: int = 1) -> tuple[Shard, ...]:
    """The chunks local workers share, cut at multiples of `batch_size`.

    At least `CHUNKS_PER_WORKER` per worker, at most `MAX_CHUNK_BATCHES` batches each.
    """
    batches = -(-total // batch_size)
    count = max(workers * CHUNKS_PER_WORKER, -(-batches // MAX_CHUNK_BATCHES))
    return split(total, count, batch_size=batch_size)


class _Chunks:
    """One worker's view of the shared chunks: what it iterates is what it takes.

    `collect_statistics` iterates its samples once per pass; each iteration is the next
    pass here. In every pass, worker k first gets chunk k (so each worker has a part, and
    the first chunks need no lock), then takes the next untaken chunk of that pass from
    the shared counter `taken[pass]` until none is left. A worker killed while it holds
    the counter's lock never releases it: `stuck` is called each second the lock stays
    taken (the driver checks its workers there, and raises if one died).
    """

    def __init__(
        self,
        source: DirectorySource,
        chunks: Sequence[Shard],
        worker: int,
        taken,
        stuck: Callable[[], None] = lambda: None,
        *,
        claimed=None,
    ) -> None:
        self.source, self.chunks, self.worker = source, chunks, worker
        self.taken, self.stuck, self.claimed = taken, stuck, claimed
        self.passes = 0
        self.samples = 0
        self.count = 0

    def __iter__(self) -> Iterator[Sample]:
        pass_ = self.passes
        self.passes += 1
        index = self.worker
        while index < len(self.chunks):
            chunk = self.chunks[index]
            self.count += 1
            self.samples += chunk.stop - chunk.start
            yield from self.source.part(chunk.start, chunk.stop)
            index = self._take(pass_)

    def _take(self, pass_: int) -> int:
        """The next untaken chunk of the pass (past the end when none is left)."""
        lock = self.taken.get_lock()
        while not lock.acquire(timeout=1.0):
            self.stuck()
        try:
            index = self.taken[pass_]
            self.taken[pass_] = index + 1
            if self.claimed is not None and index < len(self.chunks):
                self.claimed[self.worker] += 1  # under the lock: the driver reads it so
        finally:
            lock.release()
        return index


_TRACKER_WARNINGS = "ignore::UserWarning:multiprocessing.resource_tracker"


def _start_quiet_resource_tracker() -> None:
    """Starts multiprocessing's resource tracker with its warnings off.

    The tracker is the helper process that unlinks the semaphores of the queues and the
    chunk counter. A worker killed mid-run (SIGKILL, out of memory) leaves some to it, and
    it then warns on stderr at exit, after the one-line error that already says which
    worker died. It reads its warning filters from the environment it starts with.
    """
    from multiprocessing import resource_tracker

    previous = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, (previous, _TRACKER_WARNINGS)))
    try:
        resource_tracker.ensure_running()
    finally:
        if previous is None:
            del os.environ["PYTHONWARNINGS"]
        else:
            os.environ["PYTHONWARNINGS"] = previous


def run_local(
    model: ir.Model,
    source: DirectorySource,
    tensors: tuple[str, ...],
    settings: CollectSettings,
    data: DataSpec,
    workers: int,
    advance: Callable[[], None],
) -> tuple[dict[str, TensorObserver], tuple[WorkerRecord, ...], int]:
    """Runs `workers` local workers, this process being the first.

    Returns the merged statistics, what each worker did, and the number of chunks.

    Raises:
        CalibrationWorkerError: a worker died (killed, out of memory, crashed).
        QconvertError: a worker met bad data; its own error, naming the sample.
    """
    return _LocalRun(model, source, tensors, settings, data, workers, advance).run()


class _LocalCounter:
    """The per-pass chunk counter when there is nobody to share it with."""

    def __init__(self, values: Sequence[int]) -> None:
        self.values = list(values)
        self.lock = threading.Lock()

    def get_lock(self) -> threading.Lock:
        return self.lock

    def __getitem__(self, index: int) -> int:
        return self.values[index]

    def __setitem__(self, index: int, value: int) -> None:
        self.values[index] = value


class _LocalRun:
    """One `run_local`: this process calibrating its chunks, and the workers it spawned."""

    def __init__(
        self,
        model: ir.Model,
        source: DirectorySource,
        tensors: tuple[str, ...],
        settings: CollectSettings,
        data: DataSpec,
        workers: int,
        advance: Callable[[], None],
    ) -> None:
        self.model, self.source, self.tensors = model, source, tensors
        self.settings, self.data, self.advance = settings, data, advance
        self.start = time.perf_counter()
        self.chunks = chunk(len(source), workers, batch_size=settings.batch_size)
        self.workers = min(workers, len(self.chunks))
        self.passes = pass_count(len(tensors), settings)
        # Per pass, the next chunk to take: each worker starts with its own chunk.
        self.taken = _LocalCounter([self.workers] * self.passes)
        self.claimed = None  # chunks each spawned worker has taken
        self.processes: dict[int, object] = {}
        self.results: dict[int, tuple[dict[str, TensorObserver], WorkerRecord]] = {}
        self.shown: dict[int, int] = {}
        self.last_poll = time.monotonic()
        self.mine: _Chunks | None = None

    def run(self) -> tuple[dict[str, TensorObserver], tuple[WorkerRecord, ...], int]:
        try:
            self._spawn(self.workers - 1)
            self.mine = _Chunks(self.source, self.chunks, 0, self.taken, self._check_alive)
            observers = collect_statistics(
                self.model,
                self.mine,
                self.tensors,
                settings=self.settings,
                on_sample=self._on_sample,
            )
            self.results[0] = (
                observers,
                WorkerRecord(
                    index=0,
                    worker="this process",
                    samples=self.mine.samples,
                    chunks=self.mine.count,
                    seconds=time.perf_counter() - self.start,
                ),
            )
            while not self.processes.keys() <= self.results.keys():
                self._receive(REPORT_SECONDS)
        finally:
            self._stop()
        ordered = [self.results[index] for index in sorted(self.results)]
        merged = merge_shards([observers for observers, _ in ordered], self.tensors)
        records = tuple(record for _, record in ordered)
        return merged, records, len(self.chunks)

    def _spawn(self, count: int) -> None:
        """Starts `count` workers; from now on the chunk counter is shared with them."""
        if count < 1:
            return
        _start_quiet_resource_tracker()
        context = multiprocessing.get_context("spawn")
        shared = context.Array("q", self.taken.values)
        self.claimed = context.Array("q", self.workers, lock=False)
        self.messages = context.Queue()
        # The model goes through a queue, not the spawn arguments: `start` writes those
        # into a pipe that the child reads only after its imports, and 100 MB there would
        # hold this process up for that long.
        self.inbox = context.Queue()
        for index in range(1, count + 1):
            self.processes[index] = context.Process(
                target=_local_worker,
                args=(
                    self.inbox,
                    self.data,
                    self.chunks,
                    index,
                    shared,
                    self.claimed,
                    self.messages,
                ),
                name=f"qconvert calibration worker {index + 1}",
                daemon=True,
            )
            self.shown[index] = 0
        for process in self.processes.values():
            process.start()
        # Serialized while the others start; they fold statistics in line (one busy
        # thread each), whatever this process does.
        in_line = dataclasses.replace(self.settings, concurrent_runs=1)
        work = Work.of(self.model, self.tensors, in_line)
        for _ in self.processes:
            self.inbox.put(work)
        self.taken = shared

    def _on_sample(self) -> None:
        self.advance()
        if self.processes and time.monotonic() - self.last_poll >= REPORT_SECONDS:
            self._receive(None)
            self.last_poll = time.monotonic()

    def _receive(self, timeout: float | None) -> None:
        """Handles the workers' messages, waiting up to `timeout` for the first."""
        while True:
            try:
                if timeout is None:
                    kind, index, payload = self.messages.get_nowait()
                else:
                    kind, index, payload = self.messages.get(timeout=timeout)
            except queue_module.Empty:
                self._check_alive()
                return
            timeout = None
            if kind == "progress":
                for _ in range(payload - self.shown[index]):
                    self.advance()
                self.shown[index] = max(self.shown[index], payload)
            elif kind == "done":
                self.results[index] = payload
            elif kind == "error":
                raise payload
            else:  # "bug": an unexpected exception, with the worker's traceback
                raise RuntimeError(f"Calibration worker failed:\n{payload}")

    def _check_alive(self) -> None:
        _check_alive(self.processes, self.results)

    def _stop(self) -> None:
        for process in self.processes.values():
            if process.is_alive():
                process.terminate()
            process.join()
        if self.processes:
            self.messages.close()
            self.inbox.close()
            self.inbox.cancel_join_thread()  # what a dead worker did not take is dropped


def auto_workers() -> int:
    """The processes `--workers auto` may use: one per core this process may run on."""
    cores = usable_cores()
    return max(1, min(cores, MAX_AUTO_WORKERS))


def _check_alive(processes: Mapping[int, object], results: Mapping[int, object]) -> None:
    for index, process in processes.items():
        if index not in results and process.exitcode not in (None, 0):
            raise CalibrationWorkerError(
                f"Calibration worker {index + 1} (local process {process.pid}) died "
                f"(exit code {process.exitcode}); nothing was written.",
                hint="it may have run out of memory: try fewer --workers.",
            )


def _local_worker(
    inbox,
    data: DataSpec,
    chunks: Sequence[Shard],
    index: int,
    taken,
    claimed,
    messages,
) -> None:
    """A spawned worker's body: everything it has to say goes through `messages`."""
    start = time.perf_counter()
    try:
        work: Work = inbox.get()
        mine = _Chunks(data.open(), chunks, index, taken, claimed=claimed)
        observers = work.run(mine, lambda done: messages.put(("progress", index, done)))
        record = WorkerRecord(
            index=index,
            worker=f"local process {os.getpid()}",
            samples=mine.samples,
            chunks=mine.count,
            seconds=time.perf_counter() - start,
        )
        messages.put(("done", index, (observers, record)))
    except QconvertError as exc:
        messages.put(("error", index, exc))
    except Exception:  # noqa: BLE001 - a bug: its traceback goes to the driver
        messages.put(("bug", index, traceback.format_exc()))
    messages.close()
    messages.join_thread()


def collect_split(
    model: ir.Model,
    source: DirectorySource,
    tensors: tuple[str, ...],
    *,
    settings: CollectSettings,
    data: DataSpec,
    workers: int | None = 1,
    ray: RayCluster | None = None,
    advance: Callable[[], None],
    kept: KeptOutputs | None = None,
) -> tuple[dict[str, TensorObserver], Split]:
    """The statistics of `tensors` on `source`, in this process, local workers or Ray.

    `data` must open the same samples as `source` (workers re-open the folder). `advance`
    is called once per sample and pass over the data. With `ray`, `workers` > 1 sets the
    number of shards (else one per CPU of the cluster). `workers` None is `--workers
    auto`: this process starts alone and spawns one worker per further core when the
    work turns out long enough (`run_local`). `kept` gets the model's outputs on the
    first samples where they run in this process (`KeptOutputs`).
    """
    passes = pass_count(len(tensors), settings)
    auto = workers is None and ray is None
    if ray is None and (auto or workers == 1):
        # `auto`: the cores run batches side by side on this process's one session, which
        # costs one set of weights and a run's activations per core, where a process per
        # core would cost an interpreter, a model and a session each.
        runs = auto_workers() if auto else 1
        start = time.perf_counter()
        observers = collect_statistics(
            model,
            source,
            tensors,
            settings=dataclasses.replace(settings, concurrent_runs=runs),
            on_sample=advance,
            kept=kept,
        )
        record = ShardRecord(
            shard=Shard(index=0, start=0, stop=len(source)),
            worker="this process",
            seconds=time.perf_counter() - start,
        )
        backend = "this process"
        if auto:
            backend += f" (--workers auto: {runs} batch{'es' if runs > 1 else ''} at once)"
        split_ = Split(
            backend=backend, threads=settings.threads, passes=passes, shards=(record,)
        )
        return observers, split_
    # One busy thread a worker: more runs at once would only take turns with the other
    # workers' runs for the same cores.
    in_line = dataclasses.replace(settings, concurrent_runs=1)
    if ray is not None:
        from qconvert.calibration.ray_backend import run_on_ray

        results, records, backend = run_on_ray(
            Work.of(model, tensors, in_line),
            data,
            source,
            shards=workers if workers and workers > 1 else None,
            cluster=ray,
            advance=advance,
        )
        merged = merge_shards(results, tensors)
    else:
        merged, records, chunks = run_local(
            model, source, tensors, in_line, data, workers, advance
        )
        backend = (
            f"{len(records)} local processes (this one and {len(records) - 1} spawned), "
            f"{chunks} chunks shared as each got free"
        )
    split_ = Split(backend=backend, threads=settings.threads, passes=passes, shards=records)
    return merged, split_
