"""The `compress` flow: teacher → chain of stages → benchmark every variant → MLflow → champion → report."""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from squeezeflow.flows.config import RunnerConfig, SqueezeConfig, StageConfig, dump_config
from squeezeflow.flows.form import Recipe
from squeezeflow.tasks.data import check_data_task
from squeezeflow.tasks.evaluate import benchmark_task, cpu_flags, machine
from squeezeflow.tasks.families import check_stages
from squeezeflow.tasks.report import COLUMNS as REPORT_COLUMNS
from squeezeflow.tasks.report import table_rows, write_report
from squeezeflow.tasks.select import Selection, beats, same_variant, select_task
from squeezeflow.tasks.stages import STAGES
from squeezeflow.tasks.teacher import check_model_source, teacher_task
from squeezeflow.tasks.tracking import (
    close_abandoned_runs,
    fetch_incumbent,
    log_failed_variant,
    log_variant,
    register_champion,
    store_lock,
    tracking_uri,
    use_experiment,
)
from squeezeflow.tasks.variant import StageContext, Variant


@dataclass(frozen=True)
class Failure:
    """A variant that could not be made: logged as a FAILED run; its siblings and other branches go on."""

    parent: Variant
    stage: str
    lineage: str
    error: str


def carried_over(kind: str, parents: list[Variant]) -> list[Variant]:
    """Variants that stay in play past a stage without passing through it: early exit is a side branch (its
    PyTorch parents go on to the next stages), and early-exit variants wait for a quantize stage."""
    if kind == "early_exit":
        return list(parents)
    if kind == "quantize":
        return []
    return [p for p in parents if p.format == "onnx-exit"]


def teacher_and_context(cfg: SqueezeConfig) -> tuple[Variant, StageContext]:
    """The fine-tuned teacher (made once per teacher settings and data: variants live by id under
    artifacts_dir/variants, so an unchanged stage of a later run reuses its output) and what every stage reads."""
    teacher = teacher_task(cfg.model, cfg.teacher, cfg.data, cfg.artifacts_dir / "variants", cfg.seed)
    return teacher, stage_context(cfg, teacher, cfg.artifacts_dir / "cache")


def stage_context(cfg: SqueezeConfig, teacher: Variant, cache_dir: Path) -> StageContext:
    """What every stage reads: the data, labels, length and seed, the teacher, where its logits are cached."""
    return StageContext(
        data=cfg.data,
        num_labels=cfg.model.num_labels,
        max_length=cfg.model.max_length,
        seed=cfg.seed,
        teacher=teacher,
        cache_dir=cache_dir,
    )


def grow(
    teacher: Variant, ctx: StageContext, stages: list[StageConfig], out: Path
) -> tuple[list[Variant], list[Failure]]:
    """Applies each stage to every variant the previous stage produced; siblings run concurrently. Export (and
    any stage with also_teacher) also takes the teacher, so the peer path teacher>onnx>int8 is always there."""
    logger = get_run_logger()
    by_id, frontier, failures = {teacher.id: teacher}, [teacher], []
    for stage in stages:
        parents = (
            frontier + [teacher]
            if (stage.kind == "export" or stage.also_teacher) and teacher not in frontier
            else frontier
        )
        spec = STAGES[stage.kind]
        task = spec.task.with_options(retries=stage.retries)
        submitted = [
            (parent, token, task.submit(*args))
            for parent in parents
            if parent.format in spec.accepts
            for token, args in spec.plan(parent, stage, ctx, out, by_id)
        ]
        frontier = carried_over(stage.kind, parents)
        for parent, token, future in submitted:
            try:
                frontier.append(future.result())
            except Exception as e:  # isolate the failure to this branch
                failure = Failure(parent, stage.kind, f"{parent.lineage}>{token}", f"{type(e).__name__}: {e}")
                logger.error("variant %s failed: %s", failure.lineage, failure.error)
                failures.append(failure)
        by_id |= {v.id: v for v in frontier}
    return list(by_id.values()), failures


def publish_to_prefect(name: str, report_md: str, variants: list[Variant], selection: Selection) -> None:
    """The report and the variants table as Prefect artifacts, shown on the flow run in the Prefect UI."""
    key = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "squeezeflow"
    create_markdown_artifact(report_md, key=f"{key}-report", description="squeezeflow report")

    def role(v: Variant) -> str:
        roles = ["best of this run"] if v.id == selection.champion.id else []
        return ", ".join(roles + (["registered champion"] if v.id == selection.registered_id else []))

    rows = [
        {"role": role(v), **dict(zip([c for c, _ in REPORT_COLUMNS], row))}
        for v, row in zip(variants, table_rows(variants))
    ]
    create_table_artifact(rows, key=f"{key}-variants", description="every variant and its measurements")


def task_runner(runner: RunnerConfig):
    """Bounded threads, or Dask through prefect-dask: the scheduler at `dask_address`, else a LocalCluster of
    single-threaded worker processes (PyTorch's process-global state then needs no lock between them)."""
    if runner.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=runner.max_workers)
    from prefect_dask import DaskTaskRunner

    if runner.dask_address:
        return DaskTaskRunner(address=runner.dask_address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": runner.max_workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
        },
    )


def new_run_dir(cfg: SqueezeConfig) -> Path:
    return cfg.artifacts_dir / "runs" / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6:06d}"


def open_experiment(cfg: SqueezeConfig) -> str:
    """The recipe's MLflow experiment (created if new), with runs left RUNNING by dead processes marked KILLED."""
    experiment_id = use_experiment(tracking_uri(cfg.tracking, cfg.artifacts_dir), cfg.experiment, cfg.artifacts_dir)
    for run_id in close_abandoned_runs(MlflowClient(), experiment_id):
        get_run_logger().warning("marked run %s KILLED: the process that ran it is gone", run_id)
    return experiment_id


def process_tags(role: str) -> dict[str, str]:
    """Tags of a run this process keeps open: its role, and the host and pid that tell a later run it was abandoned."""
    return {
        "squeeze.role": role,
        "squeeze.host": socket.gethostname(),
        "squeeze.pid": str(os.getpid()),
        "squeeze.cpu_flags": cpu_flags(),
        "squeeze.machine": machine(),
    }


def run_compress(cfg: SqueezeConfig) -> dict:
    """Runs the flow with the recipe's task runner."""
    return compress.with_options(task_runner=task_runner(cfg.runner))(cfg)


@flow(name="compress", task_runner=ThreadPoolTaskRunner(max_workers=2))
def compress(config: Recipe) -> dict:
    """Compresses the recipe's model; `config` is a recipe (the form's shape, or a SqueezeConfig / recipe tree)."""
    cfg = config.to_config()
    started = time.perf_counter()
    # runs started from the Prefect UI or a schedule skip the CLI's preflight: the stage × family check is cheap
    check_stages(check_model_source(cfg.model), cfg.stages)
    run_dir = new_run_dir(cfg)
    experiment_id = open_experiment(cfg)
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_dir.name, tags=process_tags("pipeline")) as run:
        mlflow.log_text(dump_config(cfg), "config.yaml")
        counts = check_data_task(cfg.data, cfg.model.num_labels)
        mlflow.log_params({"name": cfg.name, "seed": cfg.seed, "model.source": cfg.model.source, **counts})

        variants, failures = grow(*teacher_and_context(cfg), cfg.stages, cfg.artifacts_dir / "variants")
        return conclude(cfg, run.info.run_id, experiment_id, run_dir, variants, failures, started)


def conclude(
    cfg: SqueezeConfig,
    run_id: str,
    experiment_id: str,
    run_dir: Path,
    variants: list[Variant],
    failures: list[Failure],
    started: float,
) -> dict:
    """Measures the variants (eval included), logs them under the active run `run_id`, chooses the best on
    validation, promotes it over the registered champion when it beats it, and writes the report."""
    logger = get_run_logger()
    # the later of two pipelines on one store measures itself against the earlier one's champion: the benchmark
    # and the promotion are one step (two benchmarks at once would also slow each other's timings)
    with store_lock(
        tracking_uri(cfg.tracking, cfg.artifacts_dir), cfg.artifacts_dir, f"promote-{cfg.registered_model}"
    ):
        incumbent = fetch_incumbent(cfg.registered_model, run_dir / "incumbent", cfg.label_names)
        measured = benchmark_task(
            variants + ([incumbent[0]] if incumbent else []), cfg.data, cfg.model.num_labels, cfg.benchmark
        )
        if incumbent:
            *measured, incumbent_measured = measured

        client = MlflowClient()
        run_ids = {v.id: log_variant(client, experiment_id, run_id, v) for v in measured}
        for failure in failures:
            log_failed_variant(
                client,
                experiment_id,
                run_id,
                failure.parent,
                failure.stage,
                failure.lineage,
                failure.error,
            )
        selection = select_task(measured, cfg.selection)
        champion = selection.champion
        name = cfg.registered_model
        if incumbent and not beats(champion, incumbent_measured, cfg.selection):
            version = incumbent[1]
            if same_variant(champion, incumbent_measured):
                registered_id = champion.id
                registry = f"{name} v{version} is this run's best already, so nothing new was registered"
            else:
                registered_id = incumbent_measured.params.get("variant_id")
                registry = (
                    f"{name} v{version} ({incumbent_measured.lineage}, p50 "
                    f"{incumbent_measured.metrics['latency_p50_ms']:.2f} ms, validation accuracy "
                    f"{incumbent_measured.metrics['val_accuracy']:.4f}) stays: this run's best does not beat it "
                    f"on this validation split"
                )
        else:
            version = register_champion(
                champion,
                name,
                cfg.label_names,
                cfg.benchmark.threads,
                previous=incumbent[1] if incumbent else None,
                why=selection.reason,
            )
            registered_id = champion.id
            registry = f"{name} v{version} is this run's best, promoted in this run" + (
                f" (v{incumbent[1]} is now @previous: p50 "
                f"{incumbent_measured.metrics['latency_p50_ms']:.2f} ms in this benchmark, validation accuracy "
                f"{incumbent_measured.metrics['val_accuracy']:.4f})"
                if incumbent
                else ""
            )
        selection = replace(selection, registered_id=registered_id, registry=registry)
        mlflow.set_tags(
            {
                "squeeze.champion": champion.id,
                "squeeze.champion_lineage": champion.lineage,
                "squeeze.champion_run_id": run_ids[champion.id],
                "squeeze.selection": selection.reason,
                "squeeze.registered_version": version,
                "squeeze.registered_variant_id": registered_id or "",
                "squeeze.registry": registry,
                "squeeze.objective": cfg.selection.objective,
            }
        )
    report_files = write_report(
        measured,
        selection,
        run_dir / "report",
        f"squeezeflow: {cfg.name}",
        machine(),
        [(f.lineage, f.error) for f in failures],
        cfg.selection.objective,
        incumbent_measured if incumbent else None,
    )
    for path in report_files:
        mlflow.log_artifact(str(path))
    publish_to_prefect(cfg.name, report_files[0].read_text(), measured, selection)
    logger.info("best of this run: %s (%s). Registered champion: %s", champion.id, champion.lineage, registry)
    # the pipeline run carries its best variant's figures, so MLflow's runs list and charts show one row per run
    mlflow.log_metrics(
        {
            **champion.metrics,
            "promoted": float(not incumbent or version != incumbent[1]),
            "failed_variants": float(len(failures)),
            "wall_time_s": time.perf_counter() - started,
        }
    )
    return {
        "pipeline_run_id": run_id,
        "experiment_id": experiment_id,
        "run_dir": str(run_dir),
        "champion": champion.id,
        "champion_feasible": selection.feasible,
        "selection": selection.reason,
        "registered_model": cfg.registered_model,
        "model_version": version,
        "promoted": not incumbent or version != incumbent[1],
        "registry": registry,
        "registered_id": registered_id,
        "variants": [v.model_dump(mode="json") for v in measured],
        "failed": [{"lineage": f.lineage, "error": f.error} for f in failures],
    }
