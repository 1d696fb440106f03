"""The compress flow as a Prefect deployment: typed parameters (a form in the Prefect UI, with the recipe's
values as defaults) and an optional cron schedule."""

from __future__ import annotations

from prefect.schedules import Cron

from squeezeflow.flows.compress import compress, task_runner
from squeezeflow.flows.config import SqueezeConfig
from squeezeflow.flows.form import Recipe
from squeezeflow.tasks.base import ConfigError


def make_deployment(cfg: SqueezeConfig, name: str | None = None, cron: str | None = None, timezone: str = "UTC"):
    """A RunnerDeployment of `compress` for `cfg`; `flow.serve`/`prefect.serve` run it."""
    schedules = []
    if cron:
        from datetime import datetime

        from cronsim import CronSim, CronSimError

        try:
            CronSim(cron, datetime(2026, 1, 1))
        except CronSimError as e:
            raise ConfigError(f"--cron {cron!r}: not a cron expression ({e})") from None
        schedules.append(Cron(cron, timezone=timezone))
    # served runs use the recipe's task runner (threads or Dask); a run triggered with other parameters keeps it
    return compress.with_options(task_runner=task_runner(cfg.runner)).to_deployment(
        name=name or cfg.name,
        parameters={"config": Recipe.model_validate(cfg).model_dump(mode="json")},
        schedules=schedules,
        description=f"squeezeflow recipe {cfg.name!r}: teacher {cfg.model.source}, stages "
        f"{[s.kind for s in cfg.stages]}",
        tags=["squeezeflow", cfg.name],
    )
