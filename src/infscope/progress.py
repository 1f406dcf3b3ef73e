"""Progress bars for long loops (fine-tuning, gradient passes, scoring): rows/s and time left.

Long stages print nothing for minutes otherwise. :func:`progress` returns a small object with
``advance(n)``; it draws a rich bar on stderr when stderr is a terminal and stays silent elsewhere
(tests, CI logs, pipes), unless ``INFSCOPE_PROGRESS=1`` forces it on or ``INFSCOPE_PROGRESS=0``
turns it off. The library never prints anything else through it, so results stay on stdout.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


class _Silent:
    """The no-op bar used when nobody watches."""

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more items done."""


class _RichBar:
    def __init__(self, progress, task) -> None:
        self._progress = progress
        self._task = task

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more items done."""
        self._progress.advance(self._task, n)


def progress_enabled() -> bool:
    """Whether bars are drawn: ``INFSCOPE_PROGRESS`` if set, else whether stderr is a terminal."""
    forced = os.environ.get("INFSCOPE_PROGRESS")
    if forced is not None:
        return forced.strip() not in ("", "0", "false", "no")
    return sys.stderr.isatty()


@contextlib.contextmanager
def progress(description: str, total: int | None, *, unit: str = "rows") -> Iterator[_Silent | _RichBar]:
    """A bar for ``total`` items of ``unit`` (rows/s and ETA); silent when not on a terminal."""
    if not progress_enabled():
        yield _Silent()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    class _Rate(TextColumn):
        def render(self, task):  # items per second, in the bar's own unit
            speed = task.finished_speed or task.speed
            return super().render(task) if speed is None else f"{speed:.2f} {unit}/s"

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        _Rate(f"- {unit}/s"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield _RichBar(bar, task)
