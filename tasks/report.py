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


def machine_note(variants: list[Variant], cpu_flags: str | None) -> str:
    """The machine line: its CPU flags, and a warning when other processes were busy during the benchmark."""
    from .evaluate import BUSY_SHARE

    share = max((v.metrics.get("bench_other_cpu_share", 0.0) for v in variants), default=0.0)
    busy = (
        f" **Warning: the machine was busy** (other processes took {share:.0%} of its CPU): latencies are inflated."
        if share > BUSY_SHARE
        else ""
    )
    return f"Benchmark machine: CPU flags {cpu_flags or 'not recorded'}; other processes {share:.0%} of its CPU.{busy}"


def table_rows(variants: list[Variant]) -> list[list[str]]:
    return [[fmt(v) for _, fmt in COLUMNS] for v in variants]


def markdown(
    variants: list[Variant],
    selection: Selection,
    title: str,
    cpu_flags: str | None = None,
    failed: list[tuple[str, str]] = (),
) -> str:
    """The report; `failed`: (lineage, error) of each variant that could not be made."""
    header = [name for name, _ in COLUMNS]
    lines = [
        f"# {title}",
        "",
        f"Champion: **{selection.champion.id}** (`{selection.champion.lineage}`): {selection.reason}.",
    ]
    lines += [
        budget_verdict(selection.champion, selection.max_accuracy_drop),
        "",
        machine_note(variants, cpu_flags),
        "",
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v, row in zip(variants, table_rows(variants)):
        marks = ("★ " if v.id == selection.champion.id else "") + ("◆ " if v.id in selection.pareto_ids else "")
        lines.append("| " + " | ".join([marks + row[0], *row[1:]]) + " |")
    lines += [
        "",
        "★ champion, ◆ on the Pareto front (validation accuracy, p50 latency, size). Choices are made on the "
        "validation "
        "split; accuracy is the eval split's, with 95 % intervals (Wilson; the drop paired against the teacher). "
        "Latency: batch 1 on the eval texts; differences within the round-to-round spread are ties.",
    ]
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


def pareto_plot(variants: list[Variant], selection: Selection, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for v in variants:
        on_front = v.id in selection.pareto_ids
        ax.scatter(
            v.metrics["latency_p50_ms"],
            v.metrics["accuracy"],
            s=20 + 4 * v.metrics["size_mb"],
            c="tab:orange" if on_front else "tab:blue",
            alpha=0.7,
            edgecolors="black" if on_front else "none",
        )
        label = v.lineage.replace("teacher>", "") if v.id != selection.champion.id else f"★ champion: {v.lineage}"
        ax.annotate(
            label,
            (v.metrics["latency_p50_ms"], v.metrics["accuracy"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    front = sorted((v for v in variants if v.id in selection.pareto_ids), key=lambda v: v.metrics["latency_p50_ms"])
    ax.plot(
        [v.metrics["latency_p50_ms"] for v in front], [v.metrics["accuracy"] for v in front], "--", c="tab:orange", lw=1
    )
    ax.set_xlabel("p50 latency, batch 1 (ms)")
    ax.set_ylabel("accuracy")
    ax.set_title("Variants (marker area ~ size on disk; orange = Pareto front)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    variants: list[Variant],
    selection: Selection,
    out_dir: Path,
    title: str,
    cpu_flags: str | None = None,
    failed: list[tuple[str, str]] = (),
) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "report.md", out_dir / "variants.csv", out_dir / "pareto.png"]
    paths[0].write_text(markdown(variants, selection, title, cpu_flags, failed))
    write_csv(variants, paths[1])
    pareto_plot(variants, selection, paths[2])
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
    )
    title = f"squeezeflow: {tags.get('mlflow.runName', pipeline_run_id)}"
    failed = client.search_runs(
        [client.get_run(pipeline_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{pipeline_run_id}' and attributes.status = 'FAILED'",
    )
    failures = [(r.data.tags.get("squeeze.lineage", "?"), r.data.tags.get("squeeze.error", "")) for r in failed]
    return (
        write_report(variants, selection, out_dir, title, tags.get("squeeze.cpu_flags"), failures),
        variants,
        selection,
    )
