"""One weight's quantization at a time for the writer, the next one computed beside it.

A weight-only conversion writes each weight's tensors (codes, scales, zero points) one
after the other while the model is serialized, computing the weight's quantization when
its first tensor is written (`passes.int4`). Done in turn, reading the float weight,
rounding it and writing its bytes leave one of the machine's cores idle at every step.

`Lookahead` keeps the writer's order: when the writer moves to a weight, the next one in
that order is read and quantized on a worker thread while the writer packs and writes the
current one. numpy's loops and file writes release the GIL, so the two run on two cores
(the rounding itself shares a weight's chunks with one more thread: `split_work`).
Memory: the weight being written and the next one, never more.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

Entry = TypeVar("Entry")
Result = TypeVar("Result")


class Lookahead(Generic[Entry, Result]):
    """`compute(entry)` for the entry asked for, the next one in `expect` order started early.

    Args:
        compute: the work for one entry; called from the caller's thread or one worker.
        key: what identifies an entry's result (entries of equal key share one result).
    """

    def __init__(
        self, compute: Callable[[Entry], Result], key: Callable[[Entry], Hashable]
    ) -> None:
        self._compute = compute
        self._key = key
        self._order: list[tuple[Hashable, Entry]] = []
        self._position: dict[Hashable, int] = {}
        self._current: tuple[Hashable, Result] | None = None
        self._pending: tuple[Hashable, Future[Result]] | None = None
        self._pool: ThreadPoolExecutor | None = None

    def expect(self, entry: Entry) -> None:
        """Adds `entry` to the order the results will be asked for (repeats are ignored)."""
        key = self._key(entry)
        if key not in self._position:
            self._position[key] = len(self._order)
            self._order.append((key, entry))

    def __call__(self, entry: Entry) -> Result:
        """The result for `entry`: the current one, the one computed ahead, or computed now."""
        key = self._key(entry)
        if self._current is not None and self._current[0] == key:
            return self._current[1]
        self._current = None  # drop the previous result before holding another
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == key:
            value = pending[1].result()
        else:
            if pending is not None:  # asked out of order: the early work is not used
                with contextlib.suppress(Exception):
                    pending[1].result()
            value = self._compute(entry)
        self._current = (key, value)
        self._start_next(key)
        return value

    def _start_next(self, key: Hashable) -> None:
        position = self._position.get(key)
        if position is None or position + 1 >= len(self._order):
            self.close()
            return
        following, entry = self._order[position + 1]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qconvert")
        self._pending = (following, self._pool.submit(self._compute, entry))

    def close(self) -> None:
        """Lets the worker thread end once its work is done; later calls compute in turn."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
