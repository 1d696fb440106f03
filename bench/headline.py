"""Writes the README's headline table from a run's report, so the figures there are generated, not typed.

python -m bench.headline artifacts/runs/trec-<timestamp>/report --command "squeeze run configs/trec.yaml"
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

START, END = "<!-- headline:start -->", "<!-- headline:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"


def _row(v: dict, champion: str, teacher_p50: float) -> str:
    def pct(name: str) -> str:
        return f"{float(v[name]) * 100:.1f}" if v.get(name) else ""

    p50 = float(v["latency_p50_ms"])
    interval = f" [{pct('accuracy_ci_low')}, {pct('accuracy_ci_high')}]" if v.get("accuracy_ci_low") else ""
    drop = f"{float(v['accuracy_drop']) * 100:+.1f}" if v.get("accuracy_drop") else ""
    name = f"**{v['lineage']}** (champion)" if v["variant_id"] == champion else v["lineage"]
    return (
        f"| {name} | {pct('val_accuracy')} | {pct('accuracy')}{interval} | {drop} | {p50:.2f} "
        f"| {teacher_p50 / p50:.1f}× | {float(v['size_mb']):.1f} |"
    )


def headline(report_dir: Path, command: str, others: int = 3) -> str:
    """The table: the teacher, the champion and the `others` fastest variants, with the machine and the command."""
    report = (report_dir / "report.md").read_text()
    champion = re.search(r"Best of this run: \*\*([^*]+)\*\*", report).group(1)
    machine = re.search(r"Benchmark machine: ([^\n]*?)\.(?: \*\*|$)", report, re.M).group(1)
    with (report_dir / "variants.csv").open() as f:
        variants = list(csv.DictReader(f))
    teacher = next(v for v in variants if v["lineage"] == "teacher")
    fastest = sorted(
        (v for v in variants if v["variant_id"] not in (champion, teacher["variant_id"])),
        key=lambda v: float(v["latency_p50_ms"]),
    )[:others]
    rows = [teacher, next(v for v in variants if v["variant_id"] == champion), *fastest]
    teacher_p50 = float(teacher["latency_p50_ms"])
    return "\n".join(
        [
            f"`{command}` on {machine}:",
            "",
            "| variant | val acc % | eval acc % [95 % CI] | eval drop, points | p50 ms | × teacher | MB |",
            "|---|---|---|---|---|---|---|",
            *(_row(v, champion, teacher_p50) for v in rows),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report_dir", type=Path, help="a run's report directory (report.md, variants.csv)")
    parser.add_argument("--command", required=True, help="the command that made the run, printed with the table")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    if not (args.report_dir / "variants.csv").is_file():
        print(f"error: {args.report_dir} holds no variants.csv: pass a run's report directory", file=sys.stderr)
        return 2
    text = args.readme.read_text()
    if START not in text or END not in text:
        print(f"error: {args.readme} has no {START} … {END} markers", file=sys.stderr)
        return 2
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    args.readme.write_text(f"{before}{START}\n{headline(args.report_dir, args.command)}\n{END}{after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
