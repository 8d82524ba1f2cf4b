"""Calibration shards as Ray tasks: the exact merge of local workers, on a cluster.

Each shard is one Ray task (one CPU, one onnxruntime thread) computing the statistics of
its contiguous part of the samples; the driver merges them in shard order exactly as with
local workers (see `shards` for why the result is bit-identical to one process).

A task gets its samples one of two ways:

- shared: it opens the data folder itself, by the driver's path (a local cluster, or a file
  system every node mounts at the same path);
- send: the driver reads the shard's samples and passes them as arrays through Ray's object
  store (a folder only the driver can read). The whole data set then sits in the object
  store during the run (Ray spills it to disk when it does not fit in memory).

`auto` reads the folder when every node of the cluster is this machine, and sends the
samples otherwise.

A task whose worker process dies is retried by Ray (`max_retries`); a shard that still fails
ends the run with `CalibrationWorkerError` and nothing is written. Bad data raises the
task's own `QconvertError`, which is not retried (it would fail again) and reaches the user
as it is. Progress: tasks report their sample counts to a small actor that the driver polls;
a retried shard counts from 0 again, and the bar waits until it passes its last count.

Ray is imported here only, and only when used (`pip install qconvert[ray]`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from qconvert.calibration.observers import TensorObserver
from qconvert.calibration.shards import (
    DataSpec,
    Shard,
    ShardRecord,
    Work,
    split,
)
from qconvert.dataset import DirectorySource, Sample
from qconvert.errors import CalibrationWorkerError, ConfigError, QconvertError

DATA_MODES = ("auto", "shared", "send")
_POLL_SECONDS = 0.2


@dataclass(frozen=True, slots=True, kw_only=True)
class RayCluster:
    """Where and how calibration runs on Ray.

    Attributes:
        address: the cluster to join (`ray://...`, `HOST:PORT` or `auto`); None joins the
            one `RAY_ADDRESS` names, or else starts a local one for this run.
        data: how tasks get their samples: auto, shared or send (see above).
        retries: how often Ray retries a shard whose worker died.
    """

    address: str | None = None
    data: str = "auto"
    retries: int = 3

    def __post_init__(self) -> None:
        if self.data not in DATA_MODES:
            raise ConfigError(
                f"Unknown --ray-data '{self.data}'.",
                hint=f"choose from {', '.join(DATA_MODES)}.",
            )
        if self.retries < 0:
            raise ConfigError(f"Ray retries {self.retries} must not be negative.")


def run_on_ray(
    work: Work,
    data: DataSpec,
    source: DirectorySource,
    *,
    shards: int | None,
    cluster: RayCluster,
    advance: Callable[[], None],
) -> tuple[list[dict[str, TensorObserver]], tuple[ShardRecord, ...], str]:
    """Runs the shards as Ray tasks; returns results in shard order, records, the backend.

    `shards` None makes one shard per CPU of the cluster. A Ray already initialized in this
    process is used as it is; otherwise this run joins (or starts) one and leaves it after.

    Raises:
        ConfigError: Ray is not installed, or the cluster cannot be reached.
        CalibrationWorkerError: a shard's worker died more often than `cluster.retries`.
        QconvertError: a task met bad data; its own error, naming the sample.
    """
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(
                address=cluster.address,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = cluster.address or "this machine"
            raise ConfigError(
                f"Cannot start or join a Ray cluster at '{where}': "
                f"{str(exc).strip().splitlines()[0]}",
                hint="check --ray ADDRESS (HOST:PORT of the head node, or ray://HOST:PORT).",
            ) from None
    try:
        return _run(ray, work, data, source, shards, cluster, advance)
    finally:
        if started:
            ray.shutdown()


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "--ray needs Ray, which is not installed.", hint="pip install 'qconvert[ray]'."
        ) from None
    # Ray logs every retried worker death as an error; the driver reports what matters.
    logging.getLogger("ray").setLevel(logging.CRITICAL)
    return ray


def _run(ray, work, data, source, shard_count, cluster, advance):
    cpus = int(ray.cluster_resources().get("CPU", 1))
    shards = split(len(source), shard_count or cpus, batch_size=work.settings.batch_size)
    send = _sends_samples(ray, cluster)
    task = ray.remote(_shard_task).options(
        num_cpus=1, max_retries=cluster.retries, retry_exceptions=False
    )
    counter = ray.remote(num_cpus=0)(_Progress).remote()
    work_ref = ray.put(work)
    refs = {}
    for shard in shards:
        part = list(source.part(shard.start, shard.stop)) if send else data
        refs[task.remote(work_ref, ray.put(part), shard, counter)] = shard
    pending = list(refs)
    results: dict[int, tuple] = {}
    shown = 0
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=_POLL_SECONDS)
            for ref in ready:
                results[refs[ref].index] = _result(ray, ref, refs[ref], cluster.retries)
            done = ray.get(counter.total.remote())
            for _ in range(done - shown):
                advance()
            shown = max(shown, done)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
    expected = len(source) * _passes(work)
    for _ in range(expected - shown):  # the last reports may still be on their way
        advance()
    how = "shared folder" if not send else "samples sent through the object store"
    nodes = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
    backend = f"Ray ({len(nodes)} node(s), {cpus} CPUs, {how})"
    records = []
    for shard in shards:
        _, seconds, node = results[shard.index]
        worker = f"Ray node {nodes.get(node, node[:12])}"
        records.append(ShardRecord(shard=shard, worker=worker, seconds=seconds))
    return [results[shard.index][0] for shard in shards], tuple(records), backend


def _passes(work: Work) -> int:
    from qconvert.calibration.collect import pass_count

    return pass_count(len(work.tensors), work.settings)


def _sends_samples(ray, cluster: RayCluster) -> bool:
    if cluster.data != "auto":
        return cluster.data == "send"
    if (cluster.address or "").startswith("ray://"):
        return True  # a Ray client: the driver's folder is on no node of the cluster
    here = ray.get_runtime_context().get_node_id()
    return any(node["NodeID"] != here for node in ray.nodes() if node["Alive"])


def _result(ray, ref, shard: Shard, retries: int) -> tuple:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, QconvertError):
            raise exc.cause from None
        raise RuntimeError(f"Calibration task of {shard.describe()} failed:\n{exc}") from None
    except ray.exceptions.RayError as exc:
        raise CalibrationWorkerError(
            f"{shard.describe().capitalize()} failed on the Ray cluster: its worker died "
            f"{retries + 1} times ({type(exc).__name__}); nothing was written.",
            hint="check the nodes' memory and logs (ray logs), or use more, smaller shards "
            "(--workers N).",
        ) from None


def _shard_task(
    work: Work, data: DataSpec | Sequence[Sample], shard: Shard, counter
) -> tuple[dict[str, TensorObserver], float, str]:
    """A Ray task: the statistics of one shard, its time and the id of its node."""
    import ray

    start = time.perf_counter()
    if isinstance(data, DataSpec):
        samples = data.open().part(shard.start, shard.stop)
    else:
        samples = data
    observers = work.run(samples, lambda done: counter.report.remote(shard.index, done))
    node = ray.get_runtime_context().get_node_id()
    return observers, time.perf_counter() - start, node


class _Progress:
    """A Ray actor: the most samples each shard has reported done."""

    def __init__(self) -> None:
        self.done: dict[int, int] = {}

    def report(self, index: int, done: int) -> None:
        self.done[index] = max(self.done.get(index, 0), done)

    def total(self) -> int:
        return sum(self.done.values())
