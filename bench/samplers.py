"""Which sampler finds the better champion within a small budget? Runs the real `search` flow on one recipe once per
sampler and seed, each in a study (and MLflow store) of its own but all sharing the trained and exported variants of
`--reuse`, and prints after how many trials each found how fast a variant within the accuracy budget (validation
p50, the search's objective), with its speed-up over the teacher measured in the same trial's benchmark.

    python -m bench.samplers bench/sst2-exits-int8.yaml --reuse BENCH/artifacts --trials 12 --seeds 2 --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import optuna

from squeezeflow.flows.config import apply_overrides, read_recipe
from squeezeflow.flows.search import SearchOptions, run_search, within_budget
from squeezeflow.tasks.base import SqueezeError
from squeezeflow.tasks.evaluate import machine


def trial_speedups(journal: Path) -> list[dict]:
    """Each completed trial's best variant: its validation accuracy, and its speed-up over the teacher measured in
    the same benchmark (None when it broke the accuracy budget)."""
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    (name,) = optuna.get_all_study_names(storage)
    rows = []
    for t in optuna.load_study(study_name=name, storage=storage).get_trials(
        deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]
    ):
        variants = {v["id"]: v for v in t.user_attrs["variants"]}
        teacher = next(v for v in variants.values() if v["stage"] == "teacher")["metrics"]["latency_p50_ms"]
        best = variants[t.user_attrs["best"]]
        feasible = within_budget(t) is True
        rows.append(
            {
                "trial": t.number,
                "lineage": best["lineage"],
                "val_accuracy": best["metrics"]["val_accuracy"],
                "p50_ms": best["metrics"]["latency_p50_ms"],
                "teacher_p50_ms": teacher,
                "speedup": teacher / best["metrics"]["latency_p50_ms"] if feasible else None,
            }
        )
    return rows


def best_so_far(rows: list[dict]) -> list[float]:
    """The lowest p50 (ms) of a trial within the accuracy budget after each trial: the search's own objective."""
    best, out = float("inf"), []
    for r in rows:
        best = min(best, r["p50_ms"] if r["speedup"] else float("inf"))
        out.append(best)
    return out


def summary(runs: list[dict], samplers: list[str], trials: int) -> list[str]:
    """A markdown table: per sampler, the lowest feasible p50 after half the trials and after all, and that variant's
    speed-up over the teacher and validation accuracy; one figure per search, separated by slashes."""
    half = trials // 2
    lines = [
        f"| sampler | searches | best p50 ms after {half} trials | after {trials} | its speed-up | its val accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for sampler in samplers:
        mine = [r for r in runs if r["sampler"] == sampler]
        curves = [best_so_far(r["trials"]) for r in mine]
        finals = [min((t for t in r["trials"] if t["speedup"]), key=lambda t: t["p50_ms"], default=None) for r in mine]
        lines.append(
            f"| {sampler} | {len(mine)} | "
            + " / ".join(f"{c[min(half, len(c)) - 1]:.3f}" for c in curves)
            + f" | {' / '.join(f'{c[-1]:.3f}' for c in curves)} | "
            + " / ".join(f"{f['speedup']:.1f}×" if f else "-" for f in finals)
            + " | "
            + " / ".join(f"{f['val_accuracy']:.4f}" if f else "-" for f in finals)
            + " |"
        )
    return lines


def run_one(recipe: Path, overrides: list[str], reuse: Path, out: Path, sampler: str, seed: int, trials: int) -> dict:
    artifacts = out / f"{sampler}-{seed}" / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    for shared in ("variants", "cache"):  # trained and exported models are shared; studies and MLflow are not
        (reuse / shared).mkdir(parents=True, exist_ok=True)
        if not (artifacts / shared).exists():
            (artifacts / shared).symlink_to((reuse / shared).resolve(), target_is_directory=True)
    tree = apply_overrides(read_recipe(recipe), str(recipe), [*overrides, f"artifacts_dir={artifacts}"])
    started = time.perf_counter()
    journals = list((artifacts / "search").glob("*.journal"))
    if not journals or len(trial_speedups(journals[0])) < trials:  # a search this bench finished is not run again
        run_search(tree, SearchOptions(trials=trials, budget_minutes=None, sampler=sampler, seed=seed), str(recipe))
    (journal,) = (artifacts / "search").glob("*.journal")
    rows = trial_speedups(journal)
    return {"sampler": sampler, "seed": seed, "seconds": time.perf_counter() - started, "trials": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path, help="a search recipe")
    parser.add_argument("--reuse", type=Path, required=True, help="an artifacts dir whose variants and cache to share")
    parser.add_argument("--out", type=Path, required=True, help="where each run's study, MLflow store and report go")
    parser.add_argument("--samplers", nargs="+", default=["tpe", "nsga2", "random"], choices=["tpe", "nsga2", "random"])
    parser.add_argument("--trials", type=int, default=8, help="trials per search (8)")
    parser.add_argument("--seeds", type=int, default=2, help="searches per sampler (2)")
    parser.add_argument("--first-seed", type=int, default=0, help="their seeds: this one and the next ones (0)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override, KEY=VALUE")
    args = parser.parse_args(argv)
    if args.trials < 2:
        parser.error("--trials: at least 2")
    runs = []
    try:
        # seeds outside: a stopped bench has every sampler at the same count
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for sampler in args.samplers:
                runs.append(run_one(args.recipe, args.overrides, args.reuse, args.out, sampler, seed, args.trials))
                curve = best_so_far(runs[-1]["trials"])
                print(
                    f"{sampler} seed {seed}: {runs[-1]['seconds'] / 60:.1f} min, best p50 ms after each trial: "
                    + " ".join(f"{s:.3f}" for s in curve),
                    flush=True,
                )
                (args.out / "samplers.json").write_text(json.dumps({"machine": machine(), "runs": runs}, indent=2))
    except SqueezeError as e:  # a recipe, data or model mistake: one line, no traceback
        parser.exit(2, f"error: {e}\n")
    print(f"machine: {machine()}")
    print("\n".join(summary(runs, args.samplers, args.trials)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
