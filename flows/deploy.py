"""The compress flow as a Prefect deployment: typed parameters (a form in the Prefect UI, with the recipe's
values as defaults) and an optional cron schedule."""

from __future__ import annotations

from prefect.schedules import Cron

from squeezeflow.flows.compress import compress, task_runner
from squeezeflow.flows.config import SqueezeConfig
from squeezeflow.flows.form import Recipe, SearchRecipe
from squeezeflow.flows.search import SearchOptions, search
from squeezeflow.flows.space import SearchSpace
from squeezeflow.tasks.base import ConfigError


def _schedules(cron: str | None, timezone: str) -> list[Cron]:
    if not cron:
        return []
    from datetime import datetime

    from cronsim import CronSim, CronSimError

    try:
        CronSim(cron, datetime(2026, 1, 1))
    except CronSimError as e:
        raise ConfigError(f"--cron {cron!r}: not a cron expression ({e})") from None
    return [Cron(cron, timezone=timezone)]


def make_deployment(cfg: SqueezeConfig, name: str | None = None, cron: str | None = None, timezone: str = "UTC"):
    """A RunnerDeployment of `compress` for `cfg`; `flow.serve`/`prefect.serve` run it."""
    # served runs use the recipe's task runner (threads or Dask); a run triggered with other parameters keeps it
    return compress.with_options(task_runner=task_runner(cfg.runner)).to_deployment(
        name=name or cfg.name,
        parameters={"config": Recipe.model_validate(cfg).model_dump(mode="json")},
        schedules=_schedules(cron, timezone),
        description=f"squeezeflow recipe {cfg.name!r}: teacher {cfg.model.source}, stages "
        f"{[s.kind for s in cfg.stages]}",
        tags=["squeezeflow", cfg.name],
    )


def make_search_deployment(
    tree: dict, options: SearchOptions, name: str | None = None, cron: str | None = None, timezone: str = "UTC"
):
    """A RunnerDeployment of the `search` flow: the recipe with its `{search: ...}` knobs and the search's options
    are the form's defaults, so a search can be started (or scheduled) from the Prefect UI."""
    space = SearchSpace(tree)
    first = space.first()
    return search.with_options(task_runner=task_runner(first.runner)).to_deployment(
        name=name or f"{first.name}-search",
        parameters={
            "recipe": SearchRecipe.model_validate(tree).model_dump(mode="json"),
            "options": options.model_dump(mode="json"),
        },
        schedules=_schedules(cron, timezone),
        description=f"squeezeflow search over {', '.join(d.name for d in space.dimensions)} of recipe {first.name!r}",
        tags=["squeezeflow", "search", first.name],
    )
