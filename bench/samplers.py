"""Which sampler finds the better champion within a small budget? Runs the real `search` flow on one recipe once per
sampler and seed, each in a study (and MLflow store) of its own but all sharing the trained and exported variants of
`--reuse`, and prints after how many trials each found how fast a variant within the accuracy budget (validation),
as a speed-up over the teacher measured in the same trial's benchmark.

    python -m bench.samplers configs/sst2-search.yaml --reuse BENCH/artifacts --trials 8 --seeds 2 --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
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
                "speedup": teacher / best["metrics"]["latency_p50_ms"] if feasible else None,
            }
        )
    return rows


def best_so_far(rows: list[dict]) -> list[float]:
    """The best feasible speed-up after each trial (0 until a trial keeps the budget)."""
    best, out = 0.0, []
    for r in rows:
        best = max(best, r["speedup"] or 0.0)
        out.append(best)
    return out


def run_one(recipe: Path, overrides: list[str], reuse: Path, out: Path, sampler: str, seed: int, trials: int) -> dict:
    artifacts = out / f"{sampler}-{seed}" / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    for shared in ("variants", "cache"):  # trained and exported models are shared; studies and MLflow are not
        (reuse / shared).mkdir(parents=True, exist_ok=True)
        if not (artifacts / shared).exists():
            (artifacts / shared).symlink_to((reuse / shared).resolve(), target_is_directory=True)
    tree = apply_overrides(read_recipe(recipe), str(recipe), [*overrides, f"artifacts_dir={artifacts}"])
    started = time.perf_counter()
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
    parser.add_argument("--seeds", type=int, default=2, help="searches per sampler, seeded 0, 1, ... (2)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override, KEY=VALUE")
    args = parser.parse_args(argv)
    if args.trials < 2:
        parser.error("--trials: at least 2")
    runs = []
    try:
        for seed in range(args.seeds):  # seeds outside: a stopped bench has every sampler at the same count
            for sampler in args.samplers:
                runs.append(run_one(args.recipe, args.overrides, args.reuse, args.out, sampler, seed, args.trials))
                curve = best_so_far(runs[-1]["trials"])
                print(
                    f"{sampler} seed {seed}: {runs[-1]['seconds'] / 60:.1f} min, best speed-up after each trial: "
                    + " ".join(f"{s:.2f}" for s in curve),
                    flush=True,
                )
                (args.out / "samplers.json").write_text(json.dumps({"machine": machine(), "runs": runs}, indent=2))
    except SqueezeError as e:  # a recipe, data or model mistake: one line, no traceback
        parser.exit(2, f"error: {e}\n")
    print(f"machine: {machine()}")
    half = args.trials // 2
    print(f"| sampler | searches | best speed-up after {half} trials | after {args.trials} | its val accuracy |")
    print("|---|---|---|---|---|")
    for sampler in args.samplers:
        mine = [r for r in runs if r["sampler"] == sampler]
        curves = [best_so_far(r["trials"]) for r in mine]
        finals = [max((t for t in r["trials"] if t["speedup"]), key=lambda t: t["speedup"], default=None) for r in mine]
        print(
            f"| {sampler} | {len(mine)} | "
            + " / ".join(f"{c[min(half, len(c)) - 1]:.2f}" for c in curves)
            + f" (mean {statistics.mean(c[min(half, len(c)) - 1] for c in curves):.2f}) | "
            + " / ".join(f"{c[-1]:.2f}" for c in curves)
            + f" (mean {statistics.mean(c[-1] for c in curves):.2f}) | "
            + " / ".join(f"{f['val_accuracy']:.4f}" if f else "-" for f in finals)
            + " |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
