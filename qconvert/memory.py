"""Hands back the memory of dropped models at the pipeline's stage boundaries.

onnx_ir graphs are reference cycles (a node knows its graph, a value its producer), so a
model a stage drops (a clone, a recipe candidate, a converted model scored once) is freed
only when Python's cycle collector runs, which it does rarely; and the heap pages a freed
onnxruntime session leaves stay with glibc until `malloc_trim` returns them. Until then
the next session is built on top of all of it: on a 224x224 residual CNN, `quantize
--data` (default recipe) crept to 697 MB.

`release_dropped()` collects and trims. It is called between stages, on the main thread,
never inside a library call, and guards the one thing a collection can break: a signal.
The collector runs finalizers (Python code), and Python runs a signal's handler at the
next bytecode it executes, which can be inside a finalizer: a KeyboardInterrupt (or the
CLI's Terminated) raised there is printed as "Exception ignored" and lost, and the run
goes on. So for the collection:

1. SIGINT and SIGTERM are blocked on the main thread (`signal.pthread_sigmask`): a signal
   sent to the process then stays pending, unless another thread takes it;
2. another thread can take it (numpy's BLAS and onnxruntime keep threads that do not block
   them), and then Python still runs the handler on the main thread at its next bytecode:
   so the handlers are also swapped for one that records the signal;
3. after the collection the handlers are put back, then the signals unblocked (a pending
   one is delivered and raises as usual), then a recorded one is handed to its handler.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import threading
from collections.abc import Callable, Iterator

_GUARDED = (signal.SIGINT, signal.SIGTERM)
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none (musl, macOS, Windows).

    Looked up among the symbols the process already has: `ctypes.util.find_library` would
    start `ldconfig` or a compiler to find libc, a child process the bench counts in the
    step's peak (calibrate on a small sample CNN: 94 -> 159 MB).
    """
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


_malloc_trim = _find_malloc_trim()


def _find_mallopt() -> Callable[[int, int], int] | None:
    """glibc's `mallopt`, or None where the C library has none (as `_find_malloc_trim`)."""
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return None


_mallopt = _find_mallopt()
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD_BYTES = 128 << 10
"""Blocks from this size up are mapped on their own, and unmapped when freed.

glibc's own starting value; what changes is that it stays there (see
`return_large_blocks`)."""
_large_blocks_returned = False


def return_large_blocks() -> None:
    """Makes every freed block of `MMAP_THRESHOLD_BYTES` or more go back to the system.

    glibc maps a large block on its own and unmaps it when freed, but each time one is
    freed it raises that threshold to the block's size (up to 32 MB), so later blocks that
    large come from the heap, whose free pages it keeps. onnxruntime builds a session from
    short-lived copies of the weights (the parsed model, the optimizer's rewritten and
    prepacked tensors): on a 224x224 residual CNN with 46 MB of weights, a float session
    at full optimization held 180 MB after it was built, 53 MB with the threshold fixed
    (its peak while building: 180 -> 122 MB), the same outputs bit for bit, at the same
    speed. Fixing the threshold is what glibc's `MALLOC_MMAP_THRESHOLD_` does at start-up;
    a value a user set there is left alone. Process-wide and lasting, once per process;
    nothing where the C library is not glibc.
    """
    global _large_blocks_returned
    if _large_blocks_returned:
        return
    _large_blocks_returned = True
    if _mallopt is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


RELEASE_GROWTH_BYTES = 32 << 20
"""How far the resident set must have grown since the last release for another to run (0:
every call releases).

A full collection walks every live object: in a process holding many (a test suite, a
notebook) one took 26 ms on average, 399 of them 10 s of a 15 s test run. Below this growth
there is too little dropped to be worth it; a dropped model that matters (a session of
150 MB, a clone of the weights) grows the resident set past it."""

RELEASE_GROWTH_SHARE = 32
"""A release also runs once the resident set has grown by 1/`RELEASE_GROWTH_SHARE` of
itself, where that is less than `RELEASE_GROWTH_BYTES`.

A `quantize` run of a small model is about 120 MB in all, and none of its stages grows
that by 32 MB: past the imports, no release ran, and the heap pages the stages' many
small arrays left free (a layer's patches a sample, a sum per channel and sample) stayed
resident under every later session. A share keeps the releases in proportion: the
larger the process, the longer both a collection and `malloc_trim` take (the trim alone
0.3-1.7 s on a fragmented 1.9 GB heap)."""

_resident_after_release = 0


def _resident_bytes() -> int | None:
    """The process's resident set from /proc (Linux); None where there is none."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


def release_dropped() -> None:
    """Frees the models dropped so far and returns the C heap's free pages to the system.

    A signal that lands during the collection is raised after it, as it would have been
    without it (see the module docstring). Off the main thread it does nothing: signal
    handlers cannot be swapped there, and the pipeline's stages run on the main thread. It
    also does nothing until the resident set has grown by `RELEASE_GROWTH_BYTES`, or by
    1/`RELEASE_GROWTH_SHARE` of itself if that is less, since the last release (where
    /proc tells; 0 releases every time).
    """
    global _resident_after_release
    if threading.current_thread() is not threading.main_thread():
        return
    resident = _resident_bytes()
    growth = RELEASE_GROWTH_BYTES
    if growth and resident is not None:
        growth = min(growth, resident // RELEASE_GROWTH_SHARE)
        if resident < _resident_after_release + growth:
            return
    with signals_held():
        gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)
    _resident_after_release = _resident_bytes() or 0


@contextlib.contextmanager
def older_objects_set_aside() -> Iterator[None]:
    """Inside, collections skip every object alive on entry (`gc.freeze`).

    A full collection walks every object the collector tracks, and in a quantize run most
    of them are the modules imported before it (43,000 of 69,000 in the default recipe on
    a 224x224 depthwise-separable CNN, where the releases took 0.63 s of CPU, against
    0.17 s with them set aside). What a run drops is made during the run, so nothing the
    releases should free is skipped; objects of the caller that die meanwhile are
    collected after the run, as they would be then anyway. Where objects are frozen
    already (a server that froze them before forking), the caller's choice stands.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class _Recorder:
    """A signal handler that notes the signals it is called for, and raises nothing."""

    def __init__(self) -> None:
        self.caught: list[int] = []

    def __call__(self, signum: int, frame: object) -> None:
        self.caught.append(signum)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Holds SIGINT and SIGTERM back from Python code inside, then raises them as usual.

    Main thread only (the caller checks): `signal.signal` works nowhere else.
    """
    recorder = _Recorder()
    previous: dict[int, Callable] = {}
    for signum in _GUARDED:
        handler = signal.getsignal(signum)
        if callable(handler):  # not SIG_IGN, SIG_DFL or one installed from C
            previous[signum] = handler
            signal.signal(signum, recorder)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _GUARDED)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        # Unblocking delivers a pending signal to the handler just put back.
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if recorder.caught:
            signum = recorder.caught[0]
            previous[signum](signum, None)
