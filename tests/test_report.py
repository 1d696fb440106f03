"""The report and its plot, from measured variants alone: what they mark and how the axes are drawn."""

from dataclasses import replace

import pytest

from squeezeflow.tasks.report import markdown, pareto_figure
from squeezeflow.tasks.select import SelectionConfig, select

from .test_select import TABLE, v


def reported(variants):
    """The table's variants with every figure the report prints."""
    extra = {"latency_p99_ms": 9.0, "params_m": 22.0, "speedup": 2.0}
    return [x.with_metrics(**{k: val for k, val in extra.items() if k not in x.metrics}) for x in variants]


def rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| variant_id")]


def test_the_report_marks_the_registered_champion_only_when_it_is_in_the_table():
    table = reported(TABLE)
    selection = select(table, SelectionConfig(max_accuracy_drop=0.01))
    kept = replace(selection, registered_id="an-older-variant", registry="m v1 (teacher>x) stays")
    text = markdown(table, kept, "t")
    assert "Best of this run: **int8**" in text and "Registered champion: m v1 (teacher>x) stays." in text
    assert [row.split(" |")[0] for row in rows(text) if "▲" in row] == ["| ▲ ◆ int8"]
    assert not any("★" in row for row in rows(text))
    promoted = replace(selection, registered_id="int8", registry="m v2 is this run's best, promoted in this run")
    assert [row.split(" |")[0] for row in rows(markdown(table, promoted, "t")) if "★" in row] == ["| ▲ ★ ◆ int8"]


@pytest.mark.parametrize("objective", ["latency", "size"])
def test_the_plot_reads_the_objective_on_a_log_axis_and_keeps_accuracy_within_0_and_1(objective):
    perfect = [v(x.id, 1.0, x.metrics["latency_p50_ms"], x.metrics["size_mb"], drop=0.0) for x in TABLE]
    fig = pareto_figure(perfect, select(perfect, SelectionConfig(objective=objective)), objective)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert ("size" if objective == "size" else "latency") in ax.get_xlabel()
    low, high = ax.get_ylim()
    assert 0.0 <= low < high <= 1.0
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["5 MB", "23 MB", "90 MB"]


def test_plot_labels_of_close_variants_do_not_overlap():
    close = [v(f"n{i}", 0.9, 4.0 + 0.01 * i, 23.0) for i in range(4)]
    fig = pareto_figure(close, select(close, SelectionConfig()), "latency")
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in fig.axes[0].texts]
    assert len(boxes) == 4
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def test_the_console_table_prints_lineages_verbatim():
    from rich.console import Console

    from squeezeflow.flows.cli import variants_table

    lineage = "teacher>distill[L3]>prune[vocab]>early_exit[0.3]"  # "[vocab]" looks like rich markup
    metrics = {"accuracy": 0.9, "latency_p50_ms": 1.0, "size_mb": 2.0, "speedup": 3.0}
    result = {"champion": "a", "registered_id": "a", "variants": [{"id": "a", "lineage": lineage, "metrics": metrics}]}
    console = Console(width=200, record=True)
    console.print(variants_table(result))
    assert lineage in console.export_text()
