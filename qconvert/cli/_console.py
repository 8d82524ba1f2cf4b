"""Terminal output: results to stdout, progress and errors to stderr, markup never parsed.

ONNX names may hold brackets, so rich markup is off everywhere (user text is never styled by
accident). Progress bars appear only on a terminal and never in CI.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
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


class BarProgress:
    """The library's `Progress`, drawn as a rich bar with rate and time left."""

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[], None]]:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TimeRemainingColumn(),
        )
        with RichProgressBar(*columns, console=stderr, transient=True) as bar:
            task_id = bar.add_task(description, total=total)
            yield lambda: bar.advance(task_id)


class _WarningHandler(logging.Handler):
    """Shows the library's warnings as `Warning:` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        warning(record.getMessage())


def show_library_warnings() -> None:
    """Routes warnings logged under `qconvert` to stderr (once per process)."""
    library = logging.getLogger("qconvert")
    if not any(isinstance(handler, _WarningHandler) for handler in library.handlers):
        handler = _WarningHandler(level=logging.WARNING)
        library.addHandler(handler)
