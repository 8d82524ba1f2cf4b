"""Cutting an ordered list into runs that fit a memory budget."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


def runs_within(items: Iterable[T], size: Callable[[T], int], budget: int) -> list[list[T]]:
    """`items` in order, cut into runs whose sizes together fit `budget` (one item at least).

    The passes that hold one matrix per layer (AdaRound's H, int4's X^T X) measure a run at a
    time, one float pass each, so their memory stays bounded whatever the model's depth.
    """
    runs: list[list[T]] = []
    held = 0
    for item in items:
        cost = size(item)
        if not runs or held + cost > budget:
            runs.append([])
            held = 0
        runs[-1].append(item)
        held += cost
    return runs
