"""The shards of a split calibration: what each worker is given, and how results merge.

Each worker opens its own onnxruntime session on the same `Work` (the model as bytes, the
tensors, the settings), streams its part of the samples (a `Shard`, opened through the
`DataSpec`) through `collect_statistics` and returns its observers; the driver merges them
with `merge_shards`. The merged statistics are bit-identical to one pass over all samples,
so the calibration file is byte-identical:

- min and max are order-free; counts and histogram bins are integers, so their sums are
  exact in any order and grouping; the bin layout is a function of [min, max] alone
  (`observers`).
- Each value a worker computes is the value one process computes: parts start at
  multiples of the batch size, and a batch never crosses such a multiple (`collect`), so
  every part runs exactly the batches of the single pass (same inputs, same kernels), and
  the histogram's sampling stride depends only on the size of one run.
- Every session, in every worker, optimizes the same graph (every calibrated tensor
  exposed, `collect`) and runs on the same number of intra-op threads
  (`CollectSettings.threads`, one by default): onnxruntime's fusions and MLAS's thread
  partitioning can change a tensor's last bits, so neither may differ between a worker
  and the single process. Cores are used by workers (or concurrent runs), not intra-op
  threads: with N workers on C cores, use N = C.

Who runs the shards, and how they share the samples, is `parallel` (this process or local
processes) or `ray_backend`; `Split` and its records tell the report how it went.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import onnx_ir as ir

from qconvert.calibration.collect import CollectSettings, collect_statistics
from qconvert.calibration.graphs import SerializedModel
from qconvert.calibration.observers import TensorObserver
from qconvert.dataset import DirectorySource, ImagePreprocessing, InputSpec, Sample
from qconvert.limits import DEFAULT_LIMITS, LoadLimits
from qconvert.runtime import external_weights, weights_folder

REPORT_SECONDS = 0.1  # workers report progress at most this often


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
    """How a worker opens the same samples as the driver.

    The folder, the selection, and the user's load limits: a worker refuses what the driver
    would refuse.
    """

    folder: str
    specs: tuple[InputSpec, ...]
    images: ImagePreprocessing | None = None
    samples: int | None = None
    seed: int = 0
    limits: LoadLimits = DEFAULT_LIMITS
    held_out: tuple[int, ...] = ()
    """Indices (after `samples`) a recipe holds out of calibration to score on."""

    def open(self) -> DirectorySource:
        """The selected samples, in the driver's order."""
        source = DirectorySource(
            self.folder, self.specs, images=self.images, limits=self.limits
        )
        if self.samples is not None and self.samples < len(source):
            source = source.subset(self.samples, seed=self.seed)
        if self.held_out:
            source = source.without(self.held_out)
        return source


@dataclass(frozen=True, slots=True, kw_only=True)
class Work:
    """What every worker computes: the statistics of `tensors` of `model`.

    Attributes:
        model: the prepared float model, serialized (workers get bytes, not objects).
        tensors: the tensors to calibrate, in the file's order.
        settings: batch size, histogram sampling, threads and tensors per pass.
        weights_folder: where the model's weights kept in external data are read from
            (`runtime.external_weights`), for workers in other processes.
    """

    model: SerializedModel
    tensors: tuple[str, ...]
    settings: CollectSettings
    weights_folder: str | None = None

    @classmethod
    def of(cls, model: ir.Model, tensors: tuple[str, ...], settings: CollectSettings) -> Work:
        """The work of calibrating `tensors` of `model`."""
        folder = weights_folder()
        return cls(
            model=SerializedModel.of(model, tensors),
            tensors=tensors,
            settings=settings,
            weights_folder=str(folder) if folder is not None else None,
        )

    def run(
        self, samples: Iterable[Sample], report: Callable[[int], None]
    ) -> dict[str, TensorObserver]:
        """The statistics of `samples`; `report(n)` gets the samples done so far."""
        done = 0
        last = time.monotonic()

        def on_sample() -> None:
            nonlocal done, last
            done += 1
            if time.monotonic() - last >= REPORT_SECONDS:
                report(done)
                last = time.monotonic()

        with external_weights(self.weights_folder):
            observers = collect_statistics(
                self.model, samples, self.tensors, settings=self.settings, on_sample=on_sample
            )
        report(done)
        return observers


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardRecord:
    """Where and how fast one contiguous shard ran, for the report."""

    shard: Shard
    worker: str
    seconds: float

    def describe(self) -> str:
        """e.g. `shard 2: samples 100-199, Ray node 10.0.0.2, 3.10 s`."""
        return (
            f"shard {self.shard.index + 1}: samples {self.shard.start}-{self.shard.stop - 1}, "
            f"{self.worker}, {self.seconds:.2f} s"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerRecord:
    """What one local worker took of the shared chunks, for the report.

    Attributes:
        index: 0 for the driver process, 1 to N - 1 for the spawned ones.
        worker: which process.
        samples: the samples it calibrated, counted once per pass over the data.
        chunks: the chunks it took, likewise.
        seconds: from its start (the driver's, or the spawned process's first line) to
            its last statistic.
    """

    index: int
    worker: str
    samples: int
    chunks: int
    seconds: float

    def describe(self) -> str:
        """e.g. `worker 2: 130 samples in 9 chunks, local process 4242, 1.20 s`."""
        return (
            f"worker {self.index + 1}: {self.samples} samples in {self.chunks} chunks, "
            f"{self.worker}, {self.seconds:.2f} s"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Split:
    """How calibration work was split: the backend, threads, passes and workers."""

    backend: str
    threads: int
    passes: int
    shards: tuple[ShardRecord | WorkerRecord, ...]

    def describe(self) -> list[str]:
        """One line for the split, then one per shard or worker."""
        if self.threads == 0:
            threads = "onnxruntime's default threads"
        else:
            threads = (
                f"{self.threads} onnxruntime thread{'s' if self.threads > 1 else ''} each"
            )
        passes = f", {self.passes} passes over the data" if self.passes > 1 else ""
        return [f"split: {self.backend}, {threads}{passes}"] + [
            f"  {record.describe()}" for record in self.shards
        ]


def merge_shards(
    results: Sequence[Mapping[str, TensorObserver]], tensors: Iterable[str]
) -> dict[str, TensorObserver]:
    """Per tensor, the workers' observers merged, in order (exact, see above)."""
    merged = {}
    for name in tensors:
        observer = TensorObserver()
        for result in results:
            observer.merge(result[name])
        merged[name] = observer
    return merged
