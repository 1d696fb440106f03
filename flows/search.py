"""The `search` flow: Optuna over a recipe's search space. Every trial is a Prefect subflow run and an MLflow run
nested under the search's, scored on the validation split only; variants are shared by id, so a trial that changes
only a late knob reuses what earlier trials trained. At the end the front's members are measured together (eval
read for the first time), and the best is chosen and registered as `compress` does."""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import mlflow
import optuna
from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import Field

from squeezeflow.flows.compress import (
    conclude,
    grow,
    new_run_dir,
    open_experiment,
    process_tags,
    task_runner,
    teacher_and_context,
)
from squeezeflow.flows.config import SqueezeConfig
from squeezeflow.flows.form import Recipe, SearchRecipe
from squeezeflow.flows.screen import Screening, calibrate, gains_of, screen_students, summary
from squeezeflow.flows.space import SearchSpace
from squeezeflow.tasks.base import StrictModel
from squeezeflow.tasks.data import check_data_task
from squeezeflow.tasks.evaluate import benchmark_task
from squeezeflow.tasks.families import check_stages
from squeezeflow.tasks.select import pareto_front, select
from squeezeflow.tasks.teacher import check_model_source
from squeezeflow.tasks.tracking import log_failed_variant
from squeezeflow.tasks.variant import Variant

# what a trial is scored on besides validation accuracy, per objective
SCORED = {"latency": "latency_p50_ms", "size": "size_mb"}


class SearchOptions(StrictModel):
    trials: int = Field(20, ge=1, le=10_000, description="Trials in the study, counting those of earlier runs.")
    budget_minutes: float | None = Field(
        45, gt=0, description="No trial starts after this many minutes (the running one finishes); None: no limit."
    )
    objective: Literal["latency", "size"] = Field("latency", description="Minimised, beside validation accuracy.")
    max_drop: float | None = Field(
        None, ge=0, le=1, description="Accuracy budget on validation (None: the recipe's selection.max_accuracy_drop)."
    )
    follow_ups: int = Field(
        2,
        ge=0,
        le=100,
        description="After each trial that trains, this many trials that keep its training knobs and draw only the "
        "others (exit thresholds, export, INT8): they reuse its trained models, at a fraction of a trial's cost.",
    )
    sampler: Literal["tpe", "nsga2", "random"] = Field(
        "tpe", description="Optuna's sampler: multivariate TPE, NSGA-II (populations of 6) or random draws."
    )
    seed: int | None = Field(None, description="Seeds the sampler (None: the recipe's seed).")
    screen: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Distil each new student first on this share of its training examples, and train it in full only "
        "if it could then keep the accuracy budget (None: every student trains in full).",
    )


def _process_alive(trial: optuna.trial.FrozenTrial) -> bool:
    if trial.user_attrs.get("host") != socket.gethostname():
        return True  # another machine's trial: not ours to judge
    try:
        os.kill(int(trial.user_attrs.get("pid", 0)), 0)
        return True
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True


def _sampler(kind: str, seed: int) -> optuna.samplers.BaseSampler:
    # each reads the accuracy budget from the constraint every trial sets; bench/samplers.py compares them
    if kind == "nsga2":  # a population small enough to breed within a budget of tens of trials
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=6)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=5)


def open_study(
    cfg: SqueezeConfig, space: SearchSpace, objective: str, sampler: str = "tpe", seed: int | None = None
) -> optuna.Study:
    """The study in a journal file under artifacts_dir/search: an unchanged recipe resumes it, several processes
    may share it. Trials left RUNNING by a killed process on this host are marked failed and queued again."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = cfg.artifacts_dir / "search" / f"{cfg.name}.journal"
    seed = cfg.seed if seed is None else seed
    path.parent.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=f"{cfg.name}-{objective}-{space.fingerprint()}",
        storage=JournalStorage(JournalFileBackend(str(path))),
        directions=["maximize", "minimize"],
        sampler=_sampler(sampler, seed),
        load_if_exists=True,
    )
    if earlier := len(study.get_trials(deepcopy=False)):
        # a resumed or joining process: the recipe's seed alone would replay the first process's draws
        study.sampler = _sampler(sampler, seed + earlier)
    for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
        if not _process_alive(t):
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs={k: v for k, v in t.user_attrs.items() if k == "follows"})
    return study


@flow(name="search-trial")
def trial_flow(config: Recipe, known: list[str], screening: Screening | None = None) -> dict:
    """One trial: the chain for this trial's recipe (variants made before are reused by id; new students screened
    first when `screening`), and the variants not in `known` measured on the validation split, the teacher beside
    them as the reference."""
    cfg = config.to_config()
    teacher, ctx = teacher_and_context(cfg)
    cfg, screened = screen_students(cfg, teacher, ctx, screening) if screening else (cfg, [])
    variants, failures = grow(teacher, ctx, cfg.stages, cfg.artifacts_dir / "variants")
    new = [v for v in variants if v.id not in known]
    if new and teacher not in new:
        new = [teacher, *new]
    measured = benchmark_task(new, cfg.data, cfg.model.num_labels, cfg.benchmark, report_eval=False) if new else []
    screened = calibrate(screened, cfg, teacher, ctx)
    return {"ids": [v.id for v in variants], "measured": measured, "failures": failures, "screen": screened}


def run_search(tree: dict, options: SearchOptions, source: str = "config") -> dict:
    space = SearchSpace(tree, source)
    return search.with_options(task_runner=task_runner(space.first().runner))(tree, options, source)


@flow(name="search")
def search(recipe: SearchRecipe, options: SearchOptions, source: str = "recipe") -> dict:
    """Searches the recipe's `{search: ...}` knobs with Optuna; registers the best variant found."""
    logger = get_run_logger()
    started = time.perf_counter()
    tree = recipe.to_tree()
    space = SearchSpace(tree, source)
    base = space.first()
    selection = base.selection.model_copy(
        update={
            "objective": options.objective,
            "max_accuracy_drop": options.max_drop if options.max_drop is not None else base.selection.max_accuracy_drop,
        }
    )
    base = base.model_copy(update={"selection": selection})
    check_stages(check_model_source(base.model), base.stages)
    metric = SCORED[options.objective]
    study = open_study(base, space, options.objective, options.sampler, options.seed)
    run_dir = new_run_dir(base)
    experiment_id = open_experiment(base)
    client = MlflowClient()
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=f"search-{run_dir.name}", tags=process_tags("search")
    ) as run:
        mlflow.log_text(json.dumps(tree, indent=2), "search_recipe.json")
        mlflow.log_params(
            {
                "name": base.name,
                "trials": options.trials,
                "budget_minutes": options.budget_minutes,
                "objective": options.objective,
                "sampler": options.sampler,
                "screen": options.screen,
                "max_accuracy_drop": selection.max_accuracy_drop,
                "study": study.study_name,
                **check_data_task(base.data, base.model.num_labels),
            }
        )
        measured: dict[str, Variant] = {}
        for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]):
            measured |= {v["id"]: Variant.model_validate(v) for v in t.user_attrs.get("variants", [])}

        training = [d.name for d in space.dimensions if d.retrains]
        follow_ups = options.follow_ups if 0 < len(training) < len(space.dimensions) else 0

        def objective(trial: optuna.Trial) -> tuple[float, float]:
            values = {d.name: d.suggest(trial) for d in space.dimensions}
            cfg = space.config(values).model_copy(update={"selection": selection})
            trial.set_user_attr("host", socket.gethostname())
            trial.set_user_attr("pid", os.getpid())
            trial_run = client.create_run(
                experiment_id,
                run_name=f"trial {trial.number}",
                tags={
                    "mlflow.parentRunId": run.info.run_id,
                    **process_tags("trial"),
                    "squeeze.trial": str(trial.number),
                    **({"squeeze.follows": str(trial.user_attrs["follows"])} if "follows" in trial.user_attrs else {}),
                },
            )
            try:
                client.log_batch(
                    trial_run.info.run_id,
                    params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in trial.params.items()],
                )
                screening = (
                    Screening(
                        fraction=options.screen,
                        max_drop=selection.max_accuracy_drop,
                        gains=gains_of(study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])),
                    )
                    if options.screen
                    else None
                )
                outcome = trial_flow.with_options(flow_run_name=f"trial-{trial.number}")(
                    cfg, sorted(measured), screening
                )
                trial.set_user_attr("screen", outcome["screen"])
                measured.update({v.id: v for v in outcome["measured"]})
                for f in outcome["failures"]:
                    log_failed_variant(
                        client, experiment_id, trial_run.info.run_id, f.parent, f.stage, f.lineage, f.error
                    )
                variants = [measured[i] for i in outcome["ids"] if i in measured]
                best = select(variants, selection)
                drop = best.champion.metrics["val_accuracy_drop"]
                # feasible at <= 0: the sampler, the front plot and best_trials read it
                trial.set_constraint("accuracy_budget", drop - selection.max_accuracy_drop)
                trial.set_user_attr("best", best.champion.id)
                trial.set_user_attr("best_lineage", best.champion.lineage)
                trial.set_user_attr("variants", [v.model_dump(mode="json") for v in variants])
                figures = {k: best.champion.metrics[k] for k in ("val_accuracy", "val_accuracy_drop", metric)}
                client.log_batch(
                    trial_run.info.run_id,
                    metrics=[mlflow.entities.Metric(k, float(v), 0, 0) for k, v in figures.items()],
                    tags=[
                        mlflow.entities.RunTag("squeeze.best_variant", best.champion.id),
                        mlflow.entities.RunTag("squeeze.best_lineage", best.champion.lineage),
                        *(
                            [mlflow.entities.RunTag("squeeze.screen", summary(outcome["screen"]))]
                            if outcome["screen"]
                            else []
                        ),
                    ],
                )
                client.set_terminated(trial_run.info.run_id, "FINISHED")
                if "follows" not in trial.user_attrs:  # queued first, so they run before the sampler's next draw
                    fixed = {name: trial.params[name] for name in training}
                    for _ in range(follow_ups):
                        study.enqueue_trial(fixed, user_attrs={"follows": trial.number})
                logger.info(
                    "trial %d: %s, validation accuracy %.4f, %s %.3f%s",
                    trial.number,
                    best.champion.lineage,
                    figures["val_accuracy"],
                    metric,
                    figures[metric],
                    f"; screened: {summary(outcome['screen'])}" if outcome["screen"] else "",
                )
                return figures["val_accuracy"], figures[metric]
            except BaseException:
                client.set_terminated(trial_run.info.run_id, "FAILED")
                raise

        done = optuna.trial.TrialState.COMPLETE
        failed_here = []

        def give_up_on_failures(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            """Stops a search whose trials keep failing (a bug, not a knob): as many failures as trials asked for."""
            if trial.state == optuna.trial.TrialState.FAIL:
                failed_here.append(trial.number)
                if len(failed_here) >= options.trials:
                    study.stop()

        if len(study.get_trials(deepcopy=False, states=[done])) < options.trials:
            study.optimize(
                objective,
                timeout=options.budget_minutes * 60 if options.budget_minutes else None,
                callbacks=[optuna.study.MaxTrialsCallback(options.trials, states=(done,)), give_up_on_failures],
                catch=(Exception,),
            )
        completed = study.get_trials(deepcopy=False, states=[done])
        if not completed:
            raise RuntimeError(f"search {study.study_name}: no trial completed (see the failed trial runs in MLflow)")
        pool = {v["id"]: Variant.model_validate(v) for t in completed for v in t.user_attrs["variants"]}
        teacher = next(v for v in pool.values() if v.stage == "teacher")
        candidates = [teacher, *[v for v in pareto_front(list(pool.values()), (metric,)) if v.id != teacher.id]]
        logger.info("measuring the front's %d members together, eval included", len(candidates))
        result = conclude(base, run.info.run_id, experiment_id, run_dir, candidates, [], started)
        files = write_search_report(study, result, space, metric, run_dir / "search")
        for path in files:
            mlflow.log_artifact(str(path), "search")
        create_markdown_artifact(files[0].read_text(), key=f"{base.name.lower()}-search", description="search report")
        mlflow.log_metrics(
            {"trials_completed": float(len(completed)), "search_wall_time_s": time.perf_counter() - started}
        )
    return {**result, "study": study.study_name, "trials_completed": len(completed), "search_report": str(files[0])}


def importances(study: optuna.Study, metric: str) -> dict[str, dict[str, float]]:
    """fANOVA importance of each knob for each objective; empty until two trials differ in some knob."""
    completed = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])
    varied = {
        name
        for name in {k for t in completed for k in t.params}
        if len({str(t.params.get(name)) for t in completed}) > 1
    }
    if len(completed) < 2 or not varied:
        return {}
    return {  # a target every trial scored the same on has no importances to give
        target: optuna.importance.get_param_importances(
            study,
            evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
            target=lambda t, i=i: t.values[i],
            params=sorted(varied),
        )
        for i, target in enumerate(("val_accuracy", metric))
        if len({t.values[i] for t in completed}) > 1
    }


def within_budget(trial: optuna.trial.FrozenTrial) -> bool | str:
    """Whether a completed trial's best variant kept the accuracy budget on validation ("" while it has no figure)."""
    constraints = trial.constraints
    return all(v <= 0 for v in constraints.values()) if constraints else ""


def write_search_report(study: optuna.Study, result: dict, space: SearchSpace, metric: str, out: Path) -> list[Path]:
    """search.md (trials, the front with its eval figures, knob importances), trials.csv and front.png."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization.matplotlib import plot_pareto_front

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    out.mkdir(parents=True, exist_ok=True)
    trials = study.trials_dataframe(attrs=("number", "state", "values", "params", "user_attrs", "duration"))
    keep = [c for c in trials.columns if not c.startswith("user_attrs_") or c in ("user_attrs_best_lineage",)]
    trials = trials[keep].assign(within_budget=[within_budget(t) for t in study.get_trials(deepcopy=False)])
    trials.to_csv(out / "trials.csv", index=False)

    # the sampler stored each trial's constraint: infeasible trials are drawn apart
    ax = plot_pareto_front(study, target_names=["validation accuracy", metric])
    ax.set_title(f"{study.study_name}: trials on validation")
    ax.figure.set_size_inches(8, 5)
    ax.figure.tight_layout()
    ax.figure.savefig(out / "front.png", dpi=110)
    matplotlib.pyplot.close(ax.figure)

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value).replace("|", "\\|")

    lines = [f"# search {study.study_name}", "", "## trials (scored on validation)", ""]
    names = [d.name for d in space.dimensions]
    screened = any(t.user_attrs.get("screen") for t in study.get_trials(deepcopy=False))
    lines += [
        "| # | state | "
        + " | ".join(names)
        + f" | best variant | val acc | {metric} | within budget |"
        + (" screened students |" if screened else "")
    ]
    lines += ["|" + "---|" * (len(names) + 6 + screened)]
    for t in study.get_trials(deepcopy=False):
        vals = t.values or [None, None]
        follows = f" (reuses #{t.user_attrs['follows']})" if "follows" in t.user_attrs else ""
        lines.append(
            f"| {t.number}{follows} | {t.state.name} | "
            + " | ".join(cell(t.params.get(n, "")) for n in names)
            + " | "
            + f"{cell(t.user_attrs.get('best_lineage', ''))} | {cell(vals[0]) if vals[0] is not None else ''} | "
            + f"{cell(vals[1]) if vals[1] is not None else ''} | {cell(within_budget(t))} |"
            + (f" {cell(summary(t.user_attrs.get('screen', [])))} |" if screened else "")
        )
    lines += ["", "## the front, measured together (eval read here, once)", ""]
    lines += [
        "| variant | lineage | val acc | eval acc [95 % CI] | eval drop [95 % CI] | p50 ms | size MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in result["variants"]:
        m = v["metrics"]
        mark = ("▲ " if v["id"] == result["champion"] else "") + ("★ " if v["id"] == result["registered_id"] else "")
        lines.append(
            f"| {mark}{v['id']} | {cell(v['lineage'])} | {m['val_accuracy']:.4f} | {m['accuracy']:.4f} "
            f"[{m['accuracy_ci_low']:.3f}, {m['accuracy_ci_high']:.3f}] | {m['accuracy_drop']:+.4f} "
            f"[{m['accuracy_drop_ci_low']:+.3f}, {m['accuracy_drop_ci_high']:+.3f}] | {m['latency_p50_ms']:.2f} | "
            f"{m['size_mb']:.1f} |"
        )
    lines += ["", f"best: {result['champion']} ({result['selection']}); registry: {result['registry']}", ""]
    ranked = {target: scores for target, scores in importances(study, metric).items() if scores}
    if ranked:
        lines += ["## knob importances (fANOVA over the completed trials)", "", "| knob | " + " | ".join(ranked) + " |"]
        lines += ["|---|" + "---|" * len(ranked)]
        for name in sorted({n for scores in ranked.values() for n in scores}):
            lines.append(f"| {name} | " + " | ".join(f"{ranked[t].get(name, 0.0):.2f}" for t in ranked) + " |")
    (out / "search.md").write_text("\n".join(lines) + "\n")
    return [out / "search.md", out / "trials.csv", out / "front.png"]
