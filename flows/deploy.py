"""The compress flow as a Prefect deployment: typed parameters (a form in the Prefect UI, with the recipe's
values as defaults) and an optional cron schedule."""

from __future__ import annotations

from prefect.schedules import Cron

from squeezeflow.flows.compress import compress
from squeezeflow.flows.config import SqueezeConfig
from squeezeflow.tasks.base import ConfigError


def make_deployment(cfg: SqueezeConfig, name: str | None = None, cron: str | None = None, timezone: str = "UTC"):
    """A RunnerDeployment of `compress` for `cfg`; `flow.serve`/`prefect.serve` run it."""
    schedules = []
    if cron:
        from cronsim import CronSim, CronSimError
        from datetime import datetime

        try:
            CronSim(cron, datetime(2026, 1, 1))
        except CronSimError as e:
            raise ConfigError(f"--cron {cron!r}: not a cron expression ({e})") from None
        schedules.append(Cron(cron, timezone=timezone))
    return compress.to_deployment(
        name=name or cfg.name,
        parameters={"config": cfg.model_dump(mode="json")},
        schedules=schedules,
        description=f"squeezeflow recipe {cfg.name!r}: teacher {cfg.model.source}, stages {[s.kind for s in cfg.stages]}",
        tags=["squeezeflow", cfg.name],
    )
