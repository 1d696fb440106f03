"""`squeeze`: run a recipe, validate it, or print the config schema."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from squeezeflow.flows.watchdog import guard_children
from squeezeflow.tasks.base import SqueezeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Compress transformer classifiers for CPU serving.")
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

SetOption = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config value: key.sub=value (repeatable).")
]


class _UserErrorsWithoutTraceback(logging.Filter):
    """Prefect logs a failing task's traceback; for a user mistake the one-line message is the whole story."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], SqueezeError):
            record.exc_info, record.exc_text = None, None
        return True


# exit codes of `squeeze run`: 0 every variant was made; 2 a mistake in the recipe, data or model (one `error:`
# line); 3 some variants failed (listed), the champion was chosen from the rest
EXIT_USER_ERROR, EXIT_VARIANTS_FAILED = 2, 3


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_USER_ERROR)


def preflight(cfg) -> None:
    """Checks what a user can get wrong before any run is opened: data files, model source, whether every stage
    supports the model's family, the artifacts dir and the tracking store."""
    from squeezeflow.tasks.data import load_splits
    from squeezeflow.tasks.families import check_stages
    from squeezeflow.tasks.teacher import check_model_source

    train = load_splits(cfg.data, cfg.model.num_labels).train
    for stage in cfg.stages:
        if hasattr(stage, "preflight"):
            stage.preflight(len(train))
    check_stages(check_model_source(cfg.model), cfg.stages)
    try:
        probe_write(cfg.artifacts_dir)
    except OSError as e:
        raise SqueezeError(f"artifacts_dir: {cfg.artifacts_dir} is not writable ({e.strerror})") from None
    check_tracking_store(cfg)


def probe_write(directory: Path) -> None:
    """Creates `directory` if needed, then writes and removes a file in it; raises OSError where it cannot."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write-test-{os.getpid()}"
    probe.write_text("")
    probe.unlink()


# how long preflight waits for another process's write to the sqlite store to end before calling it locked
STORE_LOCK_WAIT_S = 10


def check_tracking_store(cfg) -> None:
    """A sqlite tracking store (the default) can be created, or written if it exists and is not held by another
    process; a server URI is left to MLflow."""
    import sqlite3

    from squeezeflow.tasks.tracking import tracking_uri

    uri = tracking_uri(cfg.tracking, cfg.artifacts_dir)
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    field = "tracking.uri" if cfg.tracking.uri else "artifacts_dir"
    try:
        probe_write(db.parent)
    except OSError as e:
        raise SqueezeError(
            f"{field}: the MLflow store {db} cannot be written ({e.strerror}); set tracking.uri elsewhere"
        ) from None
    if not db.exists():
        return
    try:
        conn = sqlite3.connect(db, timeout=STORE_LOCK_WAIT_S)
        try:
            conn.execute("BEGIN IMMEDIATE")  # takes the write lock (and gives it back): what every MLflow write needs
            conn.rollback()
        finally:
            conn.close()
    except sqlite3.OperationalError as e:
        reason = "is locked by another process" if "locked" in str(e) else f"cannot be written ({e})"
        raise SqueezeError(
            f"{field}: the MLflow store {db} {reason}; wait for it or set tracking.uri elsewhere"
        ) from None
    except sqlite3.DatabaseError as e:
        raise SqueezeError(f"{field}: {db} is not a usable MLflow store ({e})") from None


def checked_config(path: Path, overrides: list[str] | None):
    """The recipe, loaded and preflighted; a user mistake ends the command with one line."""
    from squeezeflow.flows.config import load_config

    try:
        cfg = load_config(path, overrides)
        preflight(cfg)
    except SqueezeError as e:
        _fail(str(e))
    return cfg


def checked_search(path: Path, overrides: list[str] | None):
    """A search recipe's tree and space, checked (every searched value, and preflight at the first values)."""
    from squeezeflow.flows.config import apply_overrides, read_recipe
    from squeezeflow.flows.space import SearchSpace

    try:
        tree = apply_overrides(read_recipe(path), str(path), overrides)
        space = SearchSpace(tree, str(path))
        preflight(space.first())
    except SqueezeError as e:
        _fail(str(e))
    return tree, space


def variants_table(result: dict) -> Table:
    table = Table(title="variants (▲ best of this run, ★ registered champion)")
    for column in ("id", "lineage", "val acc", "eval acc [95 % CI]", "p50 ms", "size MB", "speedup"):
        table.add_column(column, justify="left" if column in ("id", "lineage") else "right", no_wrap=True)
    for v in result["variants"]:
        m = v["metrics"]
        star = ("▲ " if v["id"] == result["champion"] else "") + (
            "★ " if v["id"] == result.get("registered_id") else ""
        )
        interval = f" [{m['accuracy_ci_low']:.3f}, {m['accuracy_ci_high']:.3f}]" if "accuracy_ci_low" in m else ""
        table.add_row(
            star + v["id"],
            escape(v["lineage"]),  # "prune[vocab]" is not rich markup
            f"{m['val_accuracy']:.4f}" if "val_accuracy" in m else "",
            f"{m['accuracy']:.4f}{interval}",
            f"{m['latency_p50_ms']:.2f}",
            f"{m['size_mb']:.1f}",
            f"{m['speedup']:.2f}×",
        )
    return table


def print_outcome(result: dict) -> None:
    """The variants table, the best of the run and what the registry holds now."""
    console.print(variants_table(result))
    console.print(f"best of this run: [bold]{result['champion']}[/] — {result['selection']}")
    console.print(
        f"registered champion: models:/{result['registered_model']}@champion = version {result['model_version']}: "
        f"{result['registry']}"
    )


@app.command()
def run(config: Annotated[Path, typer.Argument(help="YAML recipe")], set_: SetOption = None) -> None:
    """Run the compress flow on a recipe and print the variants and the champion."""
    cfg = checked_config(config, set_)
    guard_children()
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_UserErrorsWithoutTraceback())
    from squeezeflow.flows.compress import run_compress
    from squeezeflow.flows.progress_bars import progress_bars

    started = time.perf_counter()
    try:
        with progress_bars(err):
            result = run_compress(cfg)
    except SqueezeError as e:
        _fail(str(e))
    print_outcome(result)
    console.print(
        f"MLflow pipeline run: {result['pipeline_run_id']} (experiment {result['experiment_id']}); files in "
        f"{result['run_dir']}"
    )
    console.print(  # MLflow 3's UI opens on its GenAI view unless asked for the runs
        f"in `make mlflow-ui`: http://127.0.0.1:5000/#/experiments/{result['experiment_id']}/runs/"
        f"{result['pipeline_run_id']}?workflowType=machine_learning",
        soft_wrap=True,
    )
    console.print(f"wall time: {time.perf_counter() - started:.0f}s")
    if result["failed"]:
        failed = Table(title=f"{len(result['failed'])} variant(s) failed", title_style="bold red")
        failed.add_column("lineage", no_wrap=True)
        failed.add_column("error")
        for f in result["failed"]:
            failed.add_row(escape(f["lineage"]), escape(f["error"]))
        console.print(failed)
        err.print(
            f"[bold red]{len(result['failed'])} variant(s) failed[/] (listed above and in the report); exit code "
            f"{EXIT_VARIANTS_FAILED}",
            markup=True,
            highlight=False,
        )
        raise typer.Exit(EXIT_VARIANTS_FAILED)


@app.command()
def teacher(
    config: Annotated[Path, typer.Argument(help="YAML recipe: its model, teacher and data sections are read")],
    out: Annotated[Path, typer.Option(help="Directory the fine-tuned teacher is written to (save_pretrained)")],
    set_: SetOption = None,
) -> None:
    """Fine-tune the recipe's teacher alone and save it: data-parallel over several GPUs or machines when started by
    `accelerate launch` (or CPU processes by `torchrun`). Then compress it with model.source=OUT and
    teacher.finetune=false."""
    from accelerate import PartialState

    from squeezeflow.flows.config import load_config
    from squeezeflow.tasks.data import load_splits
    from squeezeflow.tasks.teacher import check_model_source, fine_tuned
    from squeezeflow.tasks.variant import staged_dir

    try:
        cfg = load_config(config, set_)
        if not cfg.teacher.finetune:
            raise SqueezeError("teacher.finetune: false, so there is nothing to train; set it to true")
        load_splits(cfg.data, cfg.model.num_labels)
        check_model_source(cfg.model)
        if out.exists() and any(out.iterdir()):
            raise SqueezeError(f"--out: {out} is not empty; name a new directory")
        started = time.perf_counter()
        model, tokenizer, figures = fine_tuned(cfg.model, cfg.teacher, cfg.data, cfg.seed)
    except SqueezeError as e:
        _fail(str(e))
    state = PartialState()  # made by the training's Accelerator: which process this is
    if state.is_main_process:
        with staged_dir(out) as scratch:  # the directory appears whole or not at all
            model.save_pretrained(scratch, safe_serialization=True)
            tokenizer.save_pretrained(scratch)
            figures |= {"wall_seconds": time.perf_counter() - started}
            (scratch / "training.json").write_text(json.dumps(figures, indent=2) + "\n")
        console.print(
            f"teacher fine-tuned in {int(figures.get('train_processes', 1))} process(es), "
            f"{figures['wall_seconds']:.0f}s; saved to {out}\n"
            f"compress it: squeeze run {config} --set model.source={out} --set teacher.finetune=false"
        )
    state.wait_for_everyone()


def minutes(text: str) -> float:
    """A time budget: 45m, 2h, 90s, or a number of minutes."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match or float(match[1]) <= 0:
        raise typer.BadParameter(f"{text!r} is not a time budget (e.g. 45m, 2h, 90s)")
    return float(match[1]) * {"s": 1 / 60, "m": 1, "": 1, "h": 60}[match[2]]


@app.command()
def search(
    config: Annotated[Path, typer.Argument(help="YAML recipe with {search: ...} knobs")],
    trials: Annotated[int, typer.Option(min=1, help="Trials in the study (earlier runs' count)")] = 20,
    budget: Annotated[str | None, typer.Option(help="No trial starts after this long: 45m, 2h, 90s")] = "45m",
    objective: Annotated[str, typer.Option(help="latency or size, minimised beside validation accuracy")] = "latency",
    max_drop: Annotated[
        float | None, typer.Option(help="Accuracy budget on validation (default: the recipe's)")
    ] = None,
    follow_ups: Annotated[
        int, typer.Option(min=0, max=100, help="After each trial that trains: trials reusing its trained models")
    ] = 2,
    sampler: Annotated[str, typer.Option(help="tpe (multivariate TPE), nsga2 or random")] = "tpe",
    seed: Annotated[int | None, typer.Option(help="Seeds the sampler (default: the recipe's seed)")] = None,
    screen: Annotated[
        float | None,
        typer.Option(help="Distil new students first on this share of their examples; train in full the hopeful"),
    ] = None,
    set_: SetOption = None,
) -> None:
    """Search the recipe's {search: ...} knobs with Optuna on the validation split; register the best variant."""
    from squeezeflow.flows.search import SearchOptions, run_search

    if objective not in ("latency", "size"):
        _fail(f"--objective: {objective!r}; expected latency or size")
    if max_drop is not None and not 0 <= max_drop <= 1:
        _fail(f"--max-drop: {max_drop} is not a fraction (0.01 = 1 point)")
    if sampler not in ("tpe", "nsga2", "random"):
        _fail(f"--sampler: {sampler!r}; expected tpe, nsga2 or random")
    if screen is not None and not 0 < screen < 1:
        _fail(f"--screen: {screen} is not a share of the training examples (e.g. 0.25)")
    options = SearchOptions(
        trials=trials,
        budget_minutes=minutes(budget) if budget else None,
        objective=objective,
        max_drop=max_drop,
        follow_ups=follow_ups,
        sampler=sampler,
        seed=seed,
        screen=screen,
    )
    tree, _ = checked_search(config, set_)
    guard_children()
    from squeezeflow.flows.progress_bars import progress_bars

    started = time.perf_counter()
    try:
        with progress_bars(err):
            result = run_search(tree, options, str(config))
    except SqueezeError as e:
        _fail(str(e))
    print_outcome(result)
    console.print(
        f"study {result['study']}: {result['trials_completed']} trials completed; report {result['search_report']}"
    )
    console.print(f"wall time: {time.perf_counter() - started:.0f}s")


@app.command()
def serve(
    config: Annotated[Path, typer.Argument(help="YAML recipe: its values become the deployment's default parameters")],
    name: Annotated[str | None, typer.Option(help="Deployment name (default: the recipe's name)")] = None,
    cron: Annotated[str | None, typer.Option(help="Cron schedule, e.g. '0 2 * * *' for 02:00 every night")] = None,
    search_: Annotated[
        bool, typer.Option("--search", help="Serve the search flow over the recipe's {search: ...} knobs instead")
    ] = False,
    set_: SetOption = None,
) -> None:
    """Serve the compress flow (or the search flow) as a deployment: trigger it from the Prefect UI, the CLI or a
    schedule."""
    if search_:
        tree, _ = checked_search(config, set_)
    else:
        cfg = checked_config(config, set_)
    guard_children()
    try:
        from squeezeflow.flows.deploy import make_deployment, make_search_deployment
        from squeezeflow.flows.search import SearchOptions

        deployment = (
            make_search_deployment(tree, SearchOptions(), name, cron) if search_ else make_deployment(cfg, name, cron)
        )
    except SqueezeError as e:
        _fail(str(e))
    from prefect import serve as prefect_serve

    console.print(
        f"serving {deployment.flow_name}/{deployment.name}" + (f" on cron {cron!r}" if cron else "") + "; Ctrl-C stops"
    )
    prefect_serve(deployment)


def port_free(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


DEFAULT_STORE = f"sqlite:///{Path('artifacts').resolve() / 'mlflow.db'}"


def _use_store(tracking_uri: str) -> None:
    import mlflow

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).exists():
        _fail(f"--tracking-uri: no MLflow store at {tracking_uri.removeprefix('sqlite:///')}")
    mlflow.set_tracking_uri(tracking_uri)


@app.command()
def deploy(
    model_uri: Annotated[str, typer.Argument(help="The model to serve, e.g. models:/squeezeflow-trec@champion")],
    port: Annotated[int, typer.Option(help='HTTP port on 127.0.0.1 (POST / with {"texts": [...]})')] = 8000,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port (/metrics)")] = 8080,
    challenger: Annotated[str | None, typer.Option(help="A second model served beside it (A/B)")] = None,
    challenger_share: Annotated[float, typer.Option(help="Share of requests sent to the challenger")] = 0.1,
    max_batch_size: Annotated[int, typer.Option(help="Largest batch a replica forms")] = 16,
    batch_wait_ms: Annotated[float, typer.Option(help="How long a replica waits for a batch to fill")] = 2.0,
    threads: Annotated[int, typer.Option(help="Inference threads per replica")] = 1,
    min_replicas: Annotated[int, typer.Option(help="Replicas per model when idle")] = 1,
    max_replicas: Annotated[int, typer.Option(help="Replicas per model under load (autoscaling)")] = 1,
    scale_on_p99_ms: Annotated[
        float | None, typer.Option(help="Autoscale on the replicas' p99 (ms) instead of requests in flight")
    ] = None,
    tracking_uri: Annotated[str, typer.Option(help="MLflow tracking URI")] = DEFAULT_STORE,
) -> None:
    """Serve registered models with Ray Serve on 127.0.0.1: dynamic batching, autoscaling, Prometheus metrics, A/B."""
    import signal
    import tempfile

    from pydantic import ValidationError

    from squeezeflow.flows.config import format_validation_error
    from squeezeflow.flows.ray_serving import ServeOptions, fetch_model, start, stop

    try:
        options = ServeOptions(
            port=port,
            metrics_port=metrics_port,
            challenger=challenger,
            challenger_share=challenger_share,
            max_batch_size=max_batch_size,
            batch_wait_ms=batch_wait_ms,
            threads=threads,
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            scale_on_p99_ms=scale_on_p99_ms,
        )
    except ValidationError as e:
        message = format_validation_error("options", e).removeprefix("options: ").replace("(top level): ", "")
        _fail(f"--{message}".replace("_", "-"))
    for flag, number in (("--port", port), ("--metrics-port", metrics_port)):
        if not port_free(number):
            _fail(f"{flag}: 127.0.0.1:{number} is in use by another process; choose another port")
    _use_store(tracking_uri)
    guard_children()
    with tempfile.TemporaryDirectory(prefix="squeezeflow-deploy-") as tmp:
        try:
            arms = [
                (fetch_model(model_uri, Path(tmp) / "a"), 1.0 - (options.challenger_share if challenger else 0), "a")
            ]
            if challenger:
                challenged = fetch_model(challenger, Path(tmp) / "b")
                if challenged.label_names != arms[0][0].label_names:
                    raise SqueezeError(f"--challenger: {challenger} predicts other classes than {model_uri}")
                arms.append((challenged, options.challenger_share, "b"))
        except SqueezeError as e:
            _fail(str(e))
        stopping = []
        try:
            start(arms, options)
            signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))  # after Ray's start, which sets its own
            for model, share, arm in arms:
                policy = "batched" if model.batched else "one row per call"
                console.print(f"arm {arm}: {model.version} ({model.format}, {policy}), {share:.0%} of requests")
            console.print(f"serving on http://127.0.0.1:{port}/ ; metrics on http://127.0.0.1:{metrics_port}/metrics")
            console.print("Ctrl-C stops")
            while not stopping:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            stop()
    console.print("stopped")


@app.command()
def loadtest(
    config: Annotated[Path, typer.Argument(help="The recipe whose eval texts (and labels) are sent")],
    url: Annotated[str, typer.Option(help="The endpoint")] = "http://127.0.0.1:8000",
    concurrency: Annotated[str, typer.Option(help="Concurrent clients per level, rising")] = "1,2,4,8,16",
    seconds: Annotated[int, typer.Option(min=1, max=600, help="Seconds per level")] = 15,
    target_p99_ms: Annotated[float, typer.Option(help="The p99 that QPS is reported at")] = 10.0,
    model_uri: Annotated[
        str | None, typer.Option(help="Log the curve to this served model's variant run in MLflow")
    ] = None,
    tracking_uri: Annotated[str, typer.Option(help="MLflow tracking URI")] = DEFAULT_STORE,
    set_: SetOption = None,
) -> None:
    """Load a served endpoint at rising concurrency (Locust, headless) and report QPS at the p99 target."""
    from squeezeflow.flows.loadtest import check_endpoint, log_to_variant_run, qps_at_p99, run_level
    from squeezeflow.tasks.data import read_split

    try:
        levels_asked = [int(x) for x in concurrency.split(",")]
        if not levels_asked or min(levels_asked) < 1:
            raise ValueError
    except ValueError:
        _fail(f"--concurrency {concurrency!r}: expected rising client counts, e.g. 1,2,4,8")
    cfg = checked_config(config, set_)
    try:
        check_endpoint(url)
    except RuntimeError as e:
        _fail(f"--url {url}: {e}")
    split = read_split(cfg.data, "eval", cfg.model.num_labels)
    rows = list(zip(split.texts, split.labels))
    table = Table(title=f"load test of {url} ({seconds}s per level, p99 target {target_p99_ms} ms)")
    for column in ("clients", "QPS", "p50 ms", "p99 ms", "requests", "failures"):
        table.add_column(column, justify="right")
    levels = []
    for users in levels_asked:
        try:
            level = run_level(url, rows, users, seconds)
        except RuntimeError as e:
            _fail(f"{url}: {e}")
        levels.append(level)
        table.add_row(
            *(
                f"{level[k]:.1f}" if k == "qps" else str(level[k])
                for k in ("users", "qps", "p50_ms", "p99_ms", "requests", "failures")
            )
        )
    console.print(table)
    console.print(f"QPS at p99 ≤ {target_p99_ms} ms: {qps_at_p99(levels, target_p99_ms):.1f}")
    if model_uri:
        _use_store(tracking_uri)
        run_id = log_to_variant_run(model_uri, levels, target_p99_ms)
        console.print(
            f"logged to the variant run {run_id}" if run_id else f"{model_uri}: no variant run found to log to"
        )
    if any(level["failures"] for level in levels):
        raise typer.Exit(EXIT_VARIANTS_FAILED)


@app.command()
def ab(
    metrics_url: Annotated[str, typer.Argument(help="The server's metrics, e.g. http://127.0.0.1:8080/metrics")],
) -> None:
    """Compare the arms of an A/B deployment from its metrics: requests, latency and, for labelled requests,
    accuracy with its 95 % interval; say which arm wins on each."""
    import urllib.request

    from squeezeflow.flows.ab import compare_arms

    try:
        text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    except OSError as e:
        _fail(f"{metrics_url}: cannot read the metrics ({e})")
    arms, verdict = compare_arms(text)
    if not arms:
        _fail(f"{metrics_url}: no squeezeflow request metrics yet (send requests to the endpoint first)")
    table = Table(title="A/B arms")
    for column in ("arm", "model version", "requests", "p50 ms", "p99 ms", "labelled", "accuracy [95 % CI]"):
        table.add_column(column, justify="left" if column in ("arm", "model version") else "right")
    for a in arms:
        accuracy = f"{a['accuracy']:.4f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]" if a["labelled"] else ""
        table.add_row(
            a["arm"],
            a["model_version"],
            str(a["requests"]),
            f"{a['p50_ms']:.1f}",
            f"{a['p99_ms']:.1f}",
            str(a["labelled"]),
            accuracy,
        )
    console.print(table)
    console.print(verdict)


@app.command()
def validate(config: Annotated[Path, typer.Argument(help="YAML recipe")], set_: SetOption = None) -> None:
    """Check a recipe and its data without running anything; print the resolved config (for a search recipe, its
    knobs and the recipe at their first values)."""
    from squeezeflow.flows.config import dump_config, read_recipe
    from squeezeflow.flows.space import has_search

    try:
        searching = has_search(read_recipe(config))
    except SqueezeError as e:
        _fail(str(e))
    if not searching:
        console.print(dump_config(checked_config(config, set_)), highlight=False, markup=False)
        return
    _, space = checked_search(config, set_)
    for d in space.dimensions:
        console.print(f"search {d.name}: {d.spec if isinstance(d.spec, list) else d.spec.model_dump()}", markup=False)
    console.print(dump_config(space.first()), highlight=False, markup=False)


@app.command()
def report(
    run_id: Annotated[str, typer.Argument(help="MLflow run id of a pipeline run")],
    tracking_uri: Annotated[str, typer.Option(help="MLflow tracking URI")] = DEFAULT_STORE,
    out: Annotated[Path | None, typer.Option(help="Output directory (default: artifacts/reports/<run-id>)")] = None,
) -> None:
    """Rebuild a pipeline run's report (report.md, variants.csv, pareto.png) from MLflow."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from squeezeflow.tasks.report import rebuild_report

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).exists():
        _fail(f"--tracking-uri: no MLflow store at {tracking_uri.removeprefix('sqlite:///')}")
    try:
        files, variants, selection = rebuild_report(
            MlflowClient(tracking_uri), run_id, out or Path("artifacts/reports") / run_id
        )
    except (MlflowException, ValueError) as e:
        _fail(f"run {run_id}: {str(e).splitlines()[0]}")
    console.print(
        variants_table({"champion": selection.champion.id, "variants": [v.model_dump(mode="json") for v in variants]})
    )
    console.print(f"report written to {files[0].parent}: {', '.join(f.name for f in files)}")


@app.command()
def schema(
    markdown: bool = typer.Option(False, "--markdown", help="The readable reference (docs/reference.md) instead."),
    search_: bool = typer.Option(False, "--search", help="The search recipe's: every knob a value or a search."),
) -> None:
    """Print the JSON schema of a recipe."""
    if markdown:
        from squeezeflow.flows.reference import recipe_reference

        sys.stdout.write(recipe_reference())
        return
    if search_:
        from squeezeflow.flows.form import SearchRecipe

        sys.stdout.write(json.dumps(SearchRecipe.model_json_schema(), indent=2) + "\n")
        return
    from squeezeflow.flows.config import SqueezeConfig

    sys.stdout.write(json.dumps(SqueezeConfig.model_json_schema(), indent=2) + "\n")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
