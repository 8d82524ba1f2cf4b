"""Progress reporting for long steps, without the library knowing about terminals.

The library calls `progress.task(description, total)` and then `advance()` once per item;
the command line supplies a rich progress bar on a terminal and `SILENT` elsewhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol


class Progress(Protocol):
    """Something that can show the advance of a task of known length."""

    def task(
        self, description: str, total: int
    ) -> contextlib.AbstractContextManager[Callable[[], None]]:
        """A context whose value is called once per finished item."""
        ...


class _Silent:
    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[], None]]:
        yield lambda: None


SILENT: Progress = _Silent()
