"""One array job cut into independent pieces, run on the machine's cores at once.

Round-to-nearest of a large weight is a run of numpy calls on cache-sized chunks, each
chunk independent of the others (`blockwise`). numpy releases the GIL inside its loops, so
two threads, each walking its own contiguous piece of the chunks, use two cores. A piece
writes only its own slices of arrays the caller allocated, with the same operations
whichever thread runs it: the result does not depend on the thread count.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from qconvert.cpu import usable_cores

MAX_THREADS = 2
"""At most this many threads share one job. The int4 save already keeps a writer thread and
a rounding thread busy (`streaming.Lookahead`); two rounding threads fill a 2-core machine,
and the chunks' passes are bound by memory bandwidth well before many cores are."""

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def default_threads() -> int:
    """The threads a job uses: the cores this process may run on, at most MAX_THREADS."""
    cores = usable_cores()
    return max(1, min(MAX_THREADS, cores))


def pieces(total: int, count: int) -> list[tuple[int, int]]:
    """`range(total)` cut into at most `count` contiguous (start, stop) runs, near-equal."""
    count = max(1, min(count, total))
    bounds = [total * i // count for i in range(count + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(count) if bounds[i] < bounds[i + 1]]


def run_split(
    work: Callable[[int, int], None], total: int, *, threads: int | None = None
) -> None:
    """Calls `work(start, stop)` on pieces covering `range(total)`, on up to `threads` threads.

    The caller's thread runs the last piece itself; the others go to a shared pool. Returns
    once every piece is done; the first piece's error, if any, is raised then.
    """
    runs = pieces(total, default_threads() if threads is None else threads)
    if len(runs) <= 1:
        for start, stop in runs:
            work(start, stop)
        return
    pool = _shared_pool()
    futures = [pool.submit(work, start, stop) for start, stop in runs[:-1]]
    try:
        work(*runs[-1])
    finally:
        # every piece finishes before the caller goes on (or unwinds): none writes later
        errors = [future.exception() for future in futures]
    for error in errors:
        if error is not None:
            raise error


def _shared_pool() -> ThreadPoolExecutor:
    """One pool for every job; its threads idle between jobs and end with the process."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=MAX_THREADS - 1, thread_name_prefix="qconvert-split"
            )
        return _pool
