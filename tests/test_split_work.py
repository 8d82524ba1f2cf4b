"""One job's pieces on several threads: every piece once, errors raised, bytes unchanged."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from qconvert import blockwise, split_work
from qconvert.blockwise import quantize_rtn


def test_pieces_cover_the_range_once_in_order():
    assert split_work.pieces(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert split_work.pieces(2, 4) == [(0, 1), (1, 2)]  # never an empty piece
    assert split_work.pieces(0, 2) == []


def test_run_split_calls_every_piece_once_and_the_last_on_the_callers_thread():
    calls: list[tuple[int, int, str]] = []
    lock = threading.Lock()

    def work(start: int, stop: int) -> None:
        with lock:
            calls.append((start, stop, threading.current_thread().name))

    split_work.run_split(work, 9, threads=2)
    assert sorted(call[:2] for call in calls) == [(0, 4), (4, 9)]
    by_piece = {call[:2]: call[2] for call in calls}
    assert by_piece[(4, 9)] == threading.current_thread().name
    assert by_piece[(0, 4)].startswith("qconvert-split")


def test_an_error_in_a_pooled_piece_is_raised_once_every_piece_is_done():
    done = []

    def work(start: int, stop: int) -> None:
        if start == 0:
            raise ValueError("first piece")
        done.append((start, stop))

    with pytest.raises(ValueError, match="first piece"):
        split_work.run_split(work, 4, threads=2)
    assert done == [(2, 4)]


def test_default_threads_is_at_least_one_and_at_most_the_cap():
    assert 1 <= split_work.default_threads() <= split_work.MAX_THREADS


@pytest.mark.parametrize("stored", ["K,N", "N,K"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_the_packed_bytes_do_not_depend_on_the_thread_count(monkeypatch, stored, symmetric):
    # A weight of many chunks (4096 values each) with a ragged last block: the MatMulNBits
    # bytes, scales and zero points of 1, 2 and 3 threads are the same.
    monkeypatch.setattr(blockwise, "NEAREST_CHUNK_VALUES", 4096)
    rng = np.random.default_rng(11)
    w_nk = (rng.standard_normal((301, 500)) * 0.02).astype(np.float32)
    wt = w_nk if stored == "N,K" else np.ascontiguousarray(w_nk.T).T
    results = [
        quantize_rtn(wt, block_size=32, symmetric=symmetric, threads=threads)
        for threads in (1, 2, 3)
    ]
    first = blockwise.matmul_nbits_inputs(results[0])
    for other in results[1:]:
        np.testing.assert_array_equal(blockwise.matmul_nbits_inputs(other)[0], first[0])
        np.testing.assert_array_equal(other.scales, results[0].scales)
        np.testing.assert_array_equal(other.zero_points, results[0].zero_points)
