"""Terminal output: results to stdout, progress and errors to stderr, markup never parsed.

ONNX names may hold brackets, so rich markup is off everywhere (user text is never styled by
accident). Progress bars appear only on a terminal and never in CI.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgressBar

stdout = Console(markup=False, emoji=False, highlight=False)
stderr = Console(stderr=True, markup=False, emoji=False, highlight=False)


def error(message: str) -> None:
    """One line, prefixed, on stderr."""
    stderr.print(f"Error: {message}", style="bold red", soft_wrap=True)


def warning(message: str) -> None:
    """One line, prefixed, on stderr."""
    stderr.print(f"Warning: {message}", style="yellow", soft_wrap=True)


def interactive() -> bool:
    """True on a terminal outside CI: the only place progress bars are drawn."""
    return sys.stderr.isatty() and os.environ.get("CI", "").lower() not in ("1", "true", "yes")


class _RateColumn(ProgressColumn):
    """Items per second, e.g. `812 samples/s`."""

    def render(self, task):
        speed = task.finished_speed or task.speed
        return "" if speed is None else f"{speed:,.0f}/s"


class BarProgress:
    """The library's `Progress`, drawn as a rich bar with rate and time left."""

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[], None]]:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            _RateColumn(),
            TimeRemainingColumn(),
        )
        with RichProgressBar(*columns, console=stderr, transient=True) as bar:
            task_id = bar.add_task(description, total=total)
            yield lambda: bar.advance(task_id)
