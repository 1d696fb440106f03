"""The pipeline's report: a variants table (Markdown and CSV) and a latency-vs-accuracy Pareto plot."""

from __future__ import annotations

import csv
from pathlib import Path

from .select import Selection
from .variant import Variant

COLUMNS = [
    ("variant_id", lambda v: v.id),
    ("lineage", lambda v: v.lineage),
    ("val_accuracy", lambda v: f"{v.metrics['val_accuracy']:.4f}" if "val_accuracy" in v.metrics else ""),
    ("accuracy", lambda v: f"{v.metrics['accuracy']:.4f}"),
    ("accuracy_95ci", lambda v: _interval(v, "accuracy_ci")),
    ("accuracy_drop", lambda v: f"{v.metrics['accuracy_drop']:+.4f}"),
    ("drop_95ci", lambda v: _interval(v, "accuracy_drop_ci")),
    ("latency_p50_ms", lambda v: f"{v.metrics['latency_p50_ms']:.2f}"),
    ("latency_p99_ms", lambda v: f"{v.metrics['latency_p99_ms']:.2f}"),
    ("throughput_qps", lambda v: f"{v.metrics['throughput_qps']:.1f}"),
    ("size_mb", lambda v: f"{v.metrics['size_mb']:.1f}"),
    ("params_m", lambda v: f"{v.metrics['params_m']:.2f}"),
    ("peak_rss_mb", lambda v: f"{v.metrics['peak_rss_mb']:.0f}" if "peak_rss_mb" in v.metrics else ""),
    ("speedup", lambda v: f"{v.metrics['speedup']:.2f}"),
]


def _interval(v: Variant, name: str) -> str:
    low, high = v.metrics.get(f"{name}_low"), v.metrics.get(f"{name}_high")
    return (
        ""
        if low is None or high is None
        else f"[{low:+.4f}, {high:+.4f}]"
        if "drop" in name
        else f"[{low:.4f}, {high:.4f}]"
    )


def budget_verdict(champion: Variant, budget: float | None) -> str:
    """Where the champion's eval drop interval lies against the accuracy budget (which was applied on validation)."""
    low, high = champion.metrics.get("accuracy_drop_ci_low"), champion.metrics.get("accuracy_drop_ci_high")
    if budget is None or low is None or high is None:
        return ""
    where = "inside the budget" if high <= budget else "above the budget" if low > budget else "straddles the budget"
    return (
        f"Its eval accuracy drop is {champion.metrics['accuracy_drop']:+.4f} (95 % paired interval [{low:+.4f}, "
        f"{high:+.4f}]): {where} of {budget} (the budget is applied on the validation split)."
    )


def machine_note(variants: list[Variant], machine: str | None) -> str:
    """The machine line: its CPU and flags, and a warning when other processes were busy during the benchmark."""
    from .evaluate import BUSY_SHARE

    share = max((v.metrics.get("bench_other_cpu_share", 0.0) for v in variants), default=0.0)
    busy = (
        f" **Warning: the machine was busy** (other processes took {share:.0%} of its CPU): latencies are inflated."
        if share > BUSY_SHARE
        else ""
    )
    return f"Benchmark machine: {machine or 'not recorded'}; other processes took {share:.0%} of its CPU.{busy}"


def table_rows(variants: list[Variant]) -> list[list[str]]:
    return [[fmt(v) for _, fmt in COLUMNS] for v in variants]


def markdown(
    variants: list[Variant],
    selection: Selection,
    title: str,
    machine: str | None = None,
    failed: list[tuple[str, str]] = (),
    incumbent: Variant | None = None,
) -> str:
    """The report; `failed`: (lineage, error) of each variant that could not be made; `incumbent`: the champion
    registered before this run, measured in the same benchmark."""
    header = [name for name, _ in COLUMNS]
    lines = [
        f"# {title}",
        "",
        f"Best of this run: **{selection.champion.id}** (`{selection.champion.lineage}`): {selection.reason}.",
    ]
    if selection.registry:
        lines.append(f"Registered champion: {selection.registry}.")
    lines += [
        budget_verdict(selection.champion, selection.max_accuracy_drop),
        "",
        machine_note(variants, machine),
        "",
    ]
    table_head = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += table_head
    for v, row in zip(variants, table_rows(variants)):
        marks = (
            ("▲ " if v.id == selection.champion.id else "")
            + ("★ " if v.id == selection.registered_id else "")
            + ("◆ " if v.id in selection.pareto_ids else "")
        )
        lines.append("| " + " | ".join([marks + row[0], *row[1:]]) + " |")
    lines += [
        "",
        "▲ best of this run, ★ the registered champion (@champion), ◆ on the Pareto front (validation accuracy, "
        "p50 latency, size). Choices are made on the validation split; accuracy is the eval split's, with 95 % "
        "intervals (Wilson; the drop paired against the teacher). "
        "Latency: batch 1 on the eval texts; differences within the round-to-round spread are ties.",
    ]
    if incumbent:
        lines += ["", "## The champion registered before this run, measured in the same benchmark", "", *table_head]
        lines += ["| " + " | ".join(row) + " |" for row in table_rows([incumbent])]
    if failed:
        lines += ["", f"## {len(failed)} variant(s) failed", "", "| lineage | error |", "|---|---|"]
        lines += [
            f"| {lineage} | {error.replace('|', '/').splitlines()[0] if error else ''} |" for lineage, error in failed
        ]
    return "\n".join(lines) + "\n"


def write_csv(variants: list[Variant], path: Path) -> None:
    keys = sorted({k for v in variants for k in v.metrics})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant_id", "parent_id", "stage", "lineage", "format", *keys])
        for v in variants:
            writer.writerow(
                [v.id, v.parent_id or "", v.stage, v.lineage, v.format, *(v.metrics.get(k, "") for k in keys)]
            )


# what the plot's x axis shows for each selection objective (accuracy and throughput are read against latency)
X_AXES = {
    "latency": ("latency_p50_ms", "p50 latency, batch 1 (ms, log scale)"),
    "size": ("size_mb", "size on disk (MB, log scale)"),
    "accuracy": ("latency_p50_ms", "p50 latency, batch 1 (ms, log scale)"),
    "throughput": ("throughput_qps", "batch throughput (queries/s, log scale)"),
}


def pareto_figure(variants: list[Variant], selection: Selection, objective: str = "latency"):
    """Validation accuracy against the objective's axis (log scale), markers numbered and named in a side list (so
    labels never overlap), marker area by size with a legend, the accuracy axis within [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    x_key, x_label = X_AXES[objective]

    def accuracy(v: Variant) -> float:
        return v.metrics.get("val_accuracy", v.metrics["accuracy"])

    def area(size_mb: float) -> float:
        return 20 + 3 * size_mb

    rows = (len(variants) + 1) // 2
    fig, ax = plt.subplots(figsize=(10, 5 + 0.16 * rows))
    for v in variants:
        ax.scatter(
            v.metrics[x_key],
            accuracy(v),
            s=area(v.metrics["size_mb"]),
            c="tab:orange" if v.id in selection.pareto_ids else "tab:blue",
            alpha=0.6,
            edgecolors="black" if v.id == selection.champion.id else "none",
            linewidths=1.5,
            zorder=3,
        )
    front = sorted((v for v in variants if v.id in selection.pareto_ids), key=lambda v: v.metrics[x_key])
    ax.plot([v.metrics[x_key] for v in front], [accuracy(v) for v in front], "--", c="tab:orange", lw=1, zorder=2)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    values = [accuracy(v) for v in variants]
    pad = max(0.01, (max(values) - min(values)) * 0.15)
    ax.set_ylim(max(0.0, min(values) - pad), min(1.0, max(values) + pad))
    ax.set_xlabel(x_label)
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"objective: {objective}; orange: Pareto front; black edge: best of this run", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    sizes = sorted({round(v.metrics["size_mb"]) for v in variants})
    legend_sizes = sorted({sizes[0], sizes[len(sizes) // 2], sizes[-1]})
    handles = [ax.scatter([], [], s=area(mb), c="grey", alpha=0.5) for mb in legend_sizes]
    ax.legend(handles, [f"{mb} MB" for mb in legend_sizes], title="size", loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.subplots_adjust(left=0.08, right=0.86, top=0.94, bottom=0.1 + 0.03 * rows)
    # numbers beside the markers, nudged apart where markers are close, and the names in a list below the plot
    placed: list[tuple[float, float]] = []
    for number, v in enumerate(variants, 1):
        x, y = ax.transData.transform((v.metrics[x_key], accuracy(v)))
        dy = 0.0
        while any(abs(x - px) < 14 and abs(y + dy - py) < 10 for px, py in placed):
            dy += 10
        placed.append((x, y + dy))
        ax.annotate(
            str(number),
            (v.metrics[x_key], accuracy(v)),
            xytext=(7, dy),
            textcoords="offset pixels",
            fontsize=7,
            va="center",
        )
    names = [
        f"{n:>2}{' ▲' if v.id == selection.champion.id else ''}{' ★' if v.id == selection.registered_id else ''} "
        f"{v.lineage}"
        for n, v in enumerate(variants, 1)
    ]
    for column, chunk in enumerate((names[:rows], names[rows:])):
        fig.text(0.02 + 0.49 * column, 0.02 + 0.03 * rows, "\n".join(chunk), fontsize=7, va="top", family="monospace")
    fig.text(0.02, 0.02, "▲ best of this run  ★ registered champion", fontsize=7, family="monospace")
    return fig


def pareto_plot(variants: list[Variant], selection: Selection, path: Path, objective: str = "latency") -> None:
    import matplotlib.pyplot as plt

    fig = pareto_figure(variants, selection, objective)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    variants: list[Variant],
    selection: Selection,
    out_dir: Path,
    title: str,
    machine: str | None = None,
    failed: list[tuple[str, str]] = (),
    objective: str = "latency",
    incumbent: Variant | None = None,
) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "report.md", out_dir / "variants.csv", out_dir / "pareto.png"]
    paths[0].write_text(markdown(variants, selection, title, machine, failed, incumbent))
    write_csv(variants, paths[1])
    pareto_plot(variants, selection, paths[2], objective)
    return paths


def variants_from_mlflow(client, pipeline_run_id: str) -> tuple[list[Variant], dict[str, str]]:
    """The measured variants of a finished pipeline run, rebuilt from its child runs; and the run's tags."""
    pipeline = client.get_run(pipeline_run_id)
    children = client.search_runs(
        [pipeline.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{pipeline_run_id}' and tags.`squeeze.role` = 'variant' and "
        f"attributes.status = 'FINISHED'",
        max_results=10000,
    )
    variants = [
        Variant(
            id=r.data.tags["squeeze.variant_id"],
            parent_id=r.data.tags.get("squeeze.parent_id") or None,
            stage=r.data.tags["squeeze.stage"],
            lineage=r.data.tags["squeeze.lineage"],
            format=r.data.tags.get("squeeze.format", "onnx"),
            path=r.data.tags.get("squeeze.path", ""),
            params=dict(r.data.params),
            metrics=dict(r.data.metrics),
        )
        for r in sorted(children, key=lambda r: r.info.start_time)
    ]
    return variants, dict(pipeline.data.tags)


def _machine(tags: dict[str, str]) -> str | None:
    if "squeeze.machine" in tags:
        return tags["squeeze.machine"]
    return f"CPU flags {tags['squeeze.cpu_flags']}" if "squeeze.cpu_flags" in tags else None


def rebuild_report(client, pipeline_run_id: str, out_dir: Path) -> tuple[list[Path], list[Variant], Selection]:
    """`squeeze report`: the report of a finished pipeline run, from MLflow alone."""
    from .select import pareto_front

    variants, tags = variants_from_mlflow(client, pipeline_run_id)
    if not variants:
        raise ValueError(f"run {pipeline_run_id} has no finished variant runs")
    by_id = {v.id: v for v in variants}
    champion = by_id.get(tags.get("squeeze.champion", ""), variants[0])
    selection = Selection(
        champion=champion,
        feasible=True,
        reason=tags.get("squeeze.selection", "as recorded"),
        pareto_ids=[v.id for v in pareto_front(variants)],
        registered_id=tags.get("squeeze.registered_variant_id"),
        registry=tags.get("squeeze.registry", ""),
    )
    title = f"squeezeflow: {tags.get('mlflow.runName', pipeline_run_id)}"
    failed = client.search_runs(
        [client.get_run(pipeline_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{pipeline_run_id}' and attributes.status = 'FAILED'",
    )
    failures = [(r.data.tags.get("squeeze.lineage", "?"), r.data.tags.get("squeeze.error", "")) for r in failed]
    return (
        write_report(
            variants, selection, out_dir, title, _machine(tags), failures, tags.get("squeeze.objective", "latency")
        ),
        variants,
        selection,
    )
