"""Does a cheap training rank a search's knobs as full training does? Draws settings of a search recipe's distill
knobs at random, distils each student twice (on a fraction of the training examples, then on all the recipe gives
it), scores both on the validation split and prints the two rankings' agreement (Spearman, Kendall) and the time saved.

    python -m bench.fidelity configs/trec-search.yaml --settings 8 --fraction 0.25
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import optuna
from scipy.stats import kendalltau, spearmanr

from squeezeflow.flows.compress import stage_context
from squeezeflow.flows.config import apply_overrides, read_recipe
from squeezeflow.flows.space import SearchSpace
from squeezeflow.tasks.base import SqueezeError
from squeezeflow.tasks.data import load_splits
from squeezeflow.tasks.distill import distill, validation_accuracy
from squeezeflow.tasks.evaluate import machine
from squeezeflow.tasks.teacher import make_teacher


def compare(
    recipe: Path, settings: int, fraction: float, seed: int = 0, overrides: list[str] | None = None
) -> list[dict]:
    """`settings` random draws of the recipe's distill knobs, each distilled cheap and full and scored on validation."""
    tree = apply_overrides(read_recipe(recipe), str(recipe), overrides)
    space = SearchSpace(tree, str(recipe))
    base = space.first()
    if not base.stages or base.stages[0].kind != "distill":
        raise SystemExit(f"error: {recipe}: the first stage must distil; the knobs compared are its training's")
    # fine-tuned once (or reused from the recipe's artifacts), outside Prefect: no flow to report to
    teacher = make_teacher(base.model, base.teacher, base.data, base.artifacts_dir / "variants", base.seed)
    ctx = stage_context(base, teacher, base.artifacts_dir / "cache")
    train_size = len(load_splits(ctx.data, ctx.num_labels).train)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(settings):
            trial = study.ask()
            stage = space.config({d.name: d.suggest(trial) for d in space.dimensions}).stages[0]
            full_examples = min(stage.training.max_examples or train_size, train_size)
            row = {"setting": {k: v for k, v in trial.params.items() if k.startswith("distill.")}}
            for label, examples in (("cheap", max(1, round(full_examples * fraction))), ("full", full_examples)):
                cfg = stage.model_copy(
                    update={"training": stage.training.model_copy(update={"max_examples": examples})}
                )
                started = time.perf_counter()
                student = distill(teacher, cfg.students[0], cfg, ctx, Path(tmp) / f"{i}-{label}")
                row[f"{label}_seconds"] = time.perf_counter() - started
                row[f"{label}_steps"] = student.metrics["distill_train_steps"]
                row[label] = validation_accuracy(student, ctx)
            rows.append(row)
            print(
                f"{i}: {row['setting']}: "
                + ", ".join(
                    f"{k} {row[k]:.4f} ({row[k + '_steps']:.0f} steps, {row[k + '_seconds']:.0f} s)"
                    for k in ("cheap", "full")
                ),
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path, help="a search recipe whose first stage distils")
    parser.add_argument("--settings", type=int, default=8, help="knob settings drawn at random (8)")
    parser.add_argument("--fraction", type=float, default=0.25, help="the cheap training's share of examples (0.25)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the draw of settings (0)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override, KEY=VALUE")
    args = parser.parse_args(argv)
    if not 0 < args.fraction < 1:
        parser.error("--fraction: give a share between 0 and 1, e.g. 0.25")
    if args.settings < 3:
        parser.error("--settings: at least 3, or there is no ranking to compare")
    try:
        rows = compare(args.recipe, args.settings, args.fraction, args.seed, args.overrides)
    except SqueezeError as e:  # a recipe, data or model mistake: one line, no traceback
        parser.exit(2, f"error: {e}\n")
    cheap, full = [r["cheap"] for r in rows], [r["full"] for r in rows]
    rho, tau = spearmanr(cheap, full).statistic, kendalltau(cheap, full).statistic
    same_best = max(range(len(rows)), key=cheap.__getitem__) == max(range(len(rows)), key=full.__getitem__)
    saved = sum(r["cheap_seconds"] for r in rows) / sum(r["full_seconds"] for r in rows)
    print(f"machine: {machine()}")
    print(
        f"{len(rows)} settings, cheap = {args.fraction:g} of the examples: Spearman {rho:.2f}, Kendall {tau:.2f}, "
        f"same best setting: {'yes' if same_best else 'no'}; the cheap training took {saved:.0%} of the full one's time"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
