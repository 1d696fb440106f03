"""What every stage shares: the strict config base class, the user-error types, the PyTorch lock, `quiet`."""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


# transformers loads weights under a process-global "meta device" context and torch.onnx export swaps global
# state too, so a thread doing either corrupts any other thread's PyTorch work at that moment. Sibling variants
# still run concurrently (ONNX Runtime work, file I/O, calibration); PyTorch loading, training and export take
# turns under this lock.
class ProcessLock:
    """A re-entrant lock that, shipped with a task to another process (a Dask worker), stands for that
    process's own lock: locks cannot travel, and each process has its own PyTorch state to guard."""

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def __reduce__(self):
        return (_this_process_torch_lock, ())


def _this_process_torch_lock() -> ProcessLock:
    return TORCH_LOCK


TORCH_LOCK = ProcessLock()


class StrictModel(BaseModel):
    """A frozen config model that rejects unknown keys, so a typo in a YAML recipe is an error, not a no-op."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StageBase(StrictModel):
    """What every stage's config has besides its own knobs."""

    # the name a form shows for a stage section: its kind, e.g. "quantize"
    model_config = ConfigDict(model_title_generator=lambda cls: cls.model_fields["kind"].default)

    retries: int = Field(
        0, ge=0, le=10, description="Retries of a failing task of this stage before its variant is marked failed."
    )
    also_teacher: bool = Field(
        False,
        description="Also apply this stage to the teacher, not only to what the previous stage made (export always "
        "does).",
    )

    def knobs(self, *per_variant: str) -> dict:
        """The settings that shape this stage's output (part of each variant's id); `per_variant` names the
        search-space fields, each variant records its own value instead."""
        return self.model_dump(exclude={"kind", "retries", "also_teacher", *per_variant})


class _Drop(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(fragment in record.getMessage() for fragment in self.fragments)


@contextmanager
def quiet(logger: str, *fragments: str, warning: type[Warning] | None = None) -> Iterator[None]:
    """Drops, inside the block only, the records of `logger` ("root" for the root logger) whose message holds one of
    `fragments`, and warnings of class `warning`: third-party notices a user cannot act on, silenced where they
    arise."""
    target = logging.getLogger() if logger == "root" else logging.getLogger(logger)
    drop = _Drop(fragments)
    target.addFilter(drop)
    try:
        with warnings.catch_warnings():
            if warning is not None:
                warnings.simplefilter("ignore", warning)
            yield
    finally:
        target.removeFilter(drop)


# (lineage token, the arguments of the stage's task) of one variant a stage will make from one parent
Planned = list[tuple[str, tuple]]


@dataclass(frozen=True)
class Stage:
    """A stage as the flow sees it: its recipe section (`config`, whose `kind` names it), the formats of the variants it
    takes, a one-line summary, and `plan`, which lists the variants it makes from one parent (plan(parent, cfg, ctx,
    out_root, made) -> Planned; `made` maps ids to every variant made so far), each made by one call of `task`."""

    config: type[StageBase]
    accepts: tuple[str, ...]
    summary: str
    plan: Callable[..., Planned]
    task: Any  # a Prefect task

    @property
    def kind(self) -> str:
        return self.config.model_fields["kind"].default


class SqueezeError(Exception):
    """A mistake in the user's config, data or model: shown as one line, never as a traceback."""


class ConfigError(SqueezeError):
    pass


class DataError(SqueezeError):
    pass


class ModelError(SqueezeError):
    pass
