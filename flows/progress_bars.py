"""The CLI's progress display: the `squeezeflow.progress` records (training steps, benchmark rounds) drawn as rich
bars with an ETA, kept below the log lines, which are printed through the same console."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from squeezeflow.tasks.progress import PROGRESS_FIELD
from squeezeflow.tasks.progress import log as progress_log


class BarsHandler(logging.Handler):
    """One bar per running step; a finished step's bar is removed."""

    def __init__(self, progress: Progress):
        super().__init__(logging.DEBUG)
        self.progress, self.bars = progress, {}

    def emit(self, record: logging.LogRecord) -> None:
        key, description, done, total = getattr(record, PROGRESS_FIELD)
        bar: TaskID | None = self.bars.get(key)
        if bar is None:
            bar = self.bars[key] = self.progress.add_task(description, total=total)
        self.progress.update(bar, completed=done, total=total)
        if done >= total:
            self.progress.remove_task(self.bars.pop(key))


def _console_handlers() -> list[logging.Handler]:
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger()] + [
        logger for logger in logging.root.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    return [h for logger in loggers for h in logger.handlers if isinstance(h, PrefectConsoleHandler)]


@contextmanager
def progress_bars(console: Console) -> Iterator[Progress]:
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    handler, saved = BarsHandler(progress), (progress_log.level, progress_log.propagate)
    progress_log.setLevel(logging.DEBUG)
    progress_log.propagate = False  # the bars are the display; the log keeps the periodic step lines
    progress_log.addHandler(handler)
    consoles = {h: h.console for h in _console_handlers()}
    for h in consoles:
        h.console = progress.console  # log lines go above the live bars instead of through them
    try:
        with progress:
            yield progress
    finally:
        for h, original in consoles.items():
            h.console = original
        progress_log.removeHandler(handler)
        progress_log.setLevel(saved[0])
        progress_log.propagate = saved[1]
