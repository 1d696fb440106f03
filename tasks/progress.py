"""Progress of long steps (training, the benchmark) as DEBUG records of one logger: the CLI draws them as bars
with an ETA; everywhere else they are dropped before they are formatted."""

from __future__ import annotations

import logging
from contextvars import ContextVar

log = logging.getLogger("squeezeflow.progress")
PROGRESS_FIELD = "squeeze_progress"  # the record attribute holding (key, description, done, total)
making_now: ContextVar[str | None] = ContextVar("making_now", default=None)  # lineage of the variant being made


def advance(key: str, description: str, done: int, total: int) -> None:
    """`done` of `total` units of the step `key` (unique while it runs) are finished."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s %d/%d", description, done, total, extra={PROGRESS_FIELD: (key, description, done, total)})
