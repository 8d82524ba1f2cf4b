"""The memory of dropped models, handed back between stages (`memory.release_dropped`).

onnx_ir graphs are reference cycles, so a dropped model is freed only by Python's cycle
collector, which runs rarely. Between stages the pipeline collects, with SIGINT and SIGTERM
held back so that a Ctrl-C landing in a finalizer the collector runs is not lost.

Each signal test installs its handler itself: a process started in the background by a
non-interactive shell (as a CI runner can start the suite) inherits SIGINT ignored, and
Python then installs no KeyboardInterrupt handler of its own.
"""

from __future__ import annotations

import gc
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import weakref

import numpy as np
import onnx_ir as ir
import pytest

from qconvert import memory, testing
from qconvert.pipelines.state import (
    QuantizeRequest,
    QuantizeState,
    Stage,
    releasing,
    run_stages,
)


class _Raised(Exception):
    """What the test's SIGTERM handler raises, as the CLI's raises Terminated."""


def _raise_for_sigterm(signum, frame):
    raise _Raised(signum)


@pytest.fixture
def collector_off(monkeypatch):
    """The collector must not run on its own while a test leaves cycles for it, and every
    release collects, whatever the resident set did."""
    monkeypatch.setattr(memory, "RELEASE_GROWTH_BYTES", 0)
    was_enabled = gc.isenabled()
    gc.disable()
    yield
    if was_enabled:
        gc.enable()


@pytest.fixture
def handlers():
    """SIGINT raises KeyboardInterrupt and SIGTERM `_Raised`, whatever the suite inherited."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_for_sigterm)
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def _dropped_graph() -> weakref.ref:
    """A weak reference to the graph of a model already dropped, still held by its cycles."""
    model = ir.serde.deserialize_model(testing.matmul_add(k=64, n=32))
    graph = weakref.ref(model.graph)
    del model
    assert graph() is not None  # the cycles keep it past its last reference
    return graph


def test_a_dropped_model_is_freed(collector_off):
    graph = _dropped_graph()
    memory.release_dropped()
    assert graph() is None


def test_a_model_a_stage_drops_is_freed_before_the_next_stage(collector_off):
    seen = {}

    def drops_a_model(state):
        seen["graph"] = _dropped_graph()
        return state

    def looks(state):
        seen["alive in the next stage"] = seen["graph"]() is not None
        return state

    state = QuantizeState(request=QuantizeRequest(model="m.onnx", output="o.onnx"))
    run_stages([Stage(drops_a_model), Stage(looks)], state)
    assert seen["alive in the next stage"] is False


def test_a_stage_the_recipe_re_runs_frees_what_it_dropped(collector_off):
    seen = {}

    def drops_a_model(state):
        seen["graph"] = _dropped_graph()
        return state

    state = QuantizeState(request=QuantizeRequest(model="m.onnx", output="o.onnx"))
    assert releasing(drops_a_model)(state) is state
    assert seen["graph"]() is None


def test_it_works_where_the_c_library_has_no_malloc_trim(collector_off, monkeypatch):
    monkeypatch.setattr(memory, "_malloc_trim", None)
    graph = _dropped_graph()
    memory.release_dropped()
    assert graph() is None


def test_off_the_main_thread_it_leaves_the_collection_to_python(collector_off):
    graph = _dropped_graph()
    errors = []

    def worker():
        try:
            memory.release_dropped()
        except BaseException as exc:  # noqa: BLE001 - any error fails the test below
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert errors == []
    assert graph() is not None  # signal.signal works on the main thread only
    memory.release_dropped()
    assert graph() is None


class _SignalsWhenCollected:
    """In a cycle; its finalizer has `signum` sent, as a user's Ctrl-C can land.

    `to_thread`: sent to that thread (one that does not block it, as numpy's and
    onnxruntime's worker threads), else to the process.
    """

    def __init__(self, signum: int, to_thread: int | None = None) -> None:
        self.signum = signum
        self.to_thread = to_thread
        self.me = self

    def __del__(self) -> None:
        if self.to_thread is None:
            os.kill(os.getpid(), self.signum)
        else:
            signal.pthread_kill(self.to_thread, self.signum)
        # Python runs the handler at its next bytecode once a thread has taken the
        # signal, which a loaded machine can delay: run bytecode until the handler in
        # place has seen it (or has raised, into this finalizer), or it waits, blocked.
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            if getattr(signal.getsignal(self.signum), "caught", None):
                break
            if self.signum in signal.sigpending():
                break


SIGNALS = pytest.mark.parametrize(
    ("signum", "raised"),
    [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, _Raised)],
    ids=["sigint", "sigterm"],
)


@SIGNALS
def test_a_signal_landing_during_the_collection_is_raised_after_it(
    collector_off, handlers, signum, raised
):
    _SignalsWhenCollected(signum)
    graph = _dropped_graph()
    with pytest.raises(raised):
        memory.release_dropped()
    assert graph() is None  # raised after the collection, not inside it
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) & {signum} == set()


@SIGNALS
def test_a_signal_another_thread_takes_during_the_collection_is_raised_after_it(
    collector_off, handlers, signum, raised
):
    # Blocking the signal on the main thread does not hold it back when another thread
    # takes it: Python still runs the handler on the main thread at its next bytecode.
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        _SignalsWhenCollected(signum, to_thread=thread.ident)
        with pytest.raises(raised):
            memory.release_dropped()
    finally:
        stop.set()
        thread.join()


def test_the_handlers_and_the_mask_are_as_before(collector_off, handlers):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    memory.release_dropped()
    assert {s: signal.getsignal(s) for s in before} == before
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask


def test_malloc_trim_is_found_without_starting_a_process(monkeypatch):
    """Finding libc through ctypes.util starts ldconfig or a compiler: a child process
    whose peak the bench counted as calibration's own (94 -> 159 MB on digits_cnn)."""

    def no_child(*args, **kwargs):
        raise AssertionError("a child process was started")

    monkeypatch.setattr(subprocess, "Popen", no_child)
    trim = memory._find_malloc_trim()
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert trim is not None


def test_a_release_waits_until_the_resident_set_has_grown(collector_off, monkeypatch):
    monkeypatch.setattr(memory, "RELEASE_GROWTH_BYTES", 64 << 20)
    memory.release_dropped()  # sets the mark: the resident set after a release
    graph = _dropped_graph()
    memory.release_dropped()  # a few kB dropped since: not worth a full collection
    assert graph() is not None
    grown = np.ones(96 << 20, np.uint8)  # the resident set grows past the mark
    memory.release_dropped()
    assert graph() is None
    del grown


def test_a_small_process_releases_after_a_share_of_its_resident_set(
    collector_off, monkeypatch
):
    # A small model's run never grows by 32 MB: it releases once it grew by 1/32 of
    # itself. Without the share this release waited for the full RELEASE_GROWTH_BYTES.
    monkeypatch.setattr(memory, "RELEASE_GROWTH_BYTES", 1 << 40)
    monkeypatch.setattr(memory, "_resident_after_release", 0)  # another test's mark
    memory.release_dropped()  # sets the mark
    graph = _dropped_graph()
    resident = memory._resident_bytes()
    grown = np.ones(resident // memory.RELEASE_GROWTH_SHARE + (4 << 20), np.uint8)
    memory.release_dropped()
    assert graph() is None
    del grown


def test_collections_inside_a_run_skip_what_was_alive_before_it(collector_off):
    before = _dropped_graph()  # garbage made before the run: set aside with the rest
    with memory.older_objects_set_aside():
        assert gc.get_freeze_count() > 0
        during = _dropped_graph()  # a model the run drops
        memory.release_dropped()
        assert during() is None
        assert before() is not None
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert before() is None  # collected once the run is over


def test_objects_the_caller_froze_stay_frozen(collector_off):
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with memory.older_objects_set_aside():
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
