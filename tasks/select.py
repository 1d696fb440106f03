"""Choosing the champion on the validation split: the Pareto front over (validation accuracy, p50 latency, size),
constraints, then an objective, with latency differences inside the benchmark's round-to-round spread treated as
ties. The eval figures are only reported: nothing here reads them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from prefect import task
from pydantic import Field

from .base import StrictModel
from .variant import Variant


def _spread(v: Variant) -> float:
    return v.metrics.get("latency_spread_ms", 0.0)


# Each objective is a sort key: the smallest key wins.
OBJECTIVES: dict[str, Callable[[Variant], tuple]] = {
    "latency": lambda v: (v.metrics["latency_p50_ms"], -v.metrics["val_accuracy"], v.metrics["size_mb"]),
    "size": lambda v: (v.metrics["size_mb"], v.metrics["latency_p50_ms"], -v.metrics["val_accuracy"]),
    "accuracy": lambda v: (-v.metrics["val_accuracy"], v.metrics["latency_p50_ms"], v.metrics["size_mb"]),
    "throughput": lambda v: (-v.metrics["throughput_qps"], -v.metrics["val_accuracy"], v.metrics["size_mb"]),
}


def latency_tie(a: Variant, b: Variant) -> bool:
    """Whether a's and b's p50 latencies differ by no more than the larger of their round-to-round spreads."""
    return abs(a.metrics["latency_p50_ms"] - b.metrics["latency_p50_ms"]) <= max(_spread(a), _spread(b))


def best_of(variants: list[Variant], objective: str) -> Variant:
    """The objective's best; for latency, among those tied with the fastest, the higher validation accuracy, then
    the smaller size (two timings of near-equal models differ by noise, their accuracy and size do not)."""
    best = min(variants, key=OBJECTIVES[objective])
    if objective != "latency":
        return best
    tied = [v for v in variants if latency_tie(v, best)]
    return min(tied, key=lambda v: (-v.metrics["val_accuracy"], v.metrics["size_mb"], v.metrics["latency_p50_ms"]))


class SelectionConfig(StrictModel):
    max_accuracy_drop: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Largest accepted accuracy drop vs the teacher on the validation split (0.01 = 1 point).",
    )
    max_latency_ms: float | None = Field(None, gt=0, description="Optional ceiling on batch-1 p50 latency (ms).")
    max_size_mb: float | None = Field(None, gt=0, description="Optional ceiling on the weights' size on disk (MB).")
    objective: Literal["latency", "size", "accuracy", "throughput"] = Field(
        "latency", description="What to optimise among the variants that meet the constraints."
    )


@dataclass(frozen=True)
class Selection:
    champion: Variant  # the best variant of this run; whether it became the registered champion is `registry`
    feasible: bool
    reason: str
    pareto_ids: list[str]
    max_accuracy_drop: float | None = None  # the budget, applied on validation; the report sets the eval drop beside it
    registered_id: str | None = None  # the variant behind @champion after this run (None: not known)
    registry: str = ""  # one sentence: what the registry holds after this run and why


def dominates(a: Variant, b: Variant, costs: tuple[str, ...] = ("latency_p50_ms", "size_mb")) -> bool:
    """a is no worse than b on validation accuracy and every cost metric, and strictly better on one."""
    pa = (-a.metrics["val_accuracy"], *(a.metrics[c] for c in costs))
    pb = (-b.metrics["val_accuracy"], *(b.metrics[c] for c in costs))
    return all(x <= y for x, y in zip(pa, pb)) and pa != pb


def pareto_front(variants: list[Variant], costs: tuple[str, ...] = ("latency_p50_ms", "size_mb")) -> list[Variant]:
    """The variants no other dominates on validation accuracy and `costs`."""
    return [v for v in variants if not any(dominates(o, v, costs) for o in variants if o is not v)]


def violations(v: Variant, cfg: SelectionConfig) -> list[str]:
    out = []
    if v.metrics["val_accuracy_drop"] > cfg.max_accuracy_drop + 1e-12:
        out.append(f"val_accuracy_drop {v.metrics['val_accuracy_drop']:.4f} > {cfg.max_accuracy_drop}")
    if cfg.max_latency_ms is not None and v.metrics["latency_p50_ms"] > cfg.max_latency_ms:
        out.append(f"latency_p50_ms {v.metrics['latency_p50_ms']:.2f} > {cfg.max_latency_ms}")
    if cfg.max_size_mb is not None and v.metrics["size_mb"] > cfg.max_size_mb:
        out.append(f"size_mb {v.metrics['size_mb']:.2f} > {cfg.max_size_mb}")
    return out


def select(variants: list[Variant], cfg: SelectionConfig) -> Selection:
    """The best feasible variant by the objective; if none is feasible, the one that breaks the constraints
    least (fewest violations, then the objective) is kept, with the reason, so there is always a champion."""
    if not variants:
        raise ValueError("select: no measured variants")
    front = pareto_front(variants)
    key = OBJECTIVES[cfg.objective]
    feasible = [v for v in variants if not violations(v, cfg)]
    if feasible:
        best = best_of(feasible, cfg.objective)
        return Selection(
            best,
            True,
            f"best {cfg.objective} of {len(feasible)} feasible variants",
            [v.id for v in front],
            cfg.max_accuracy_drop,
        )
    best = min(variants, key=lambda v: (len(violations(v, cfg)), key(v)))
    reason = f"no variant meets the constraints; best-so-far {best.id} violates: {'; '.join(violations(best, cfg))}"
    return Selection(best, False, reason, [v.id for v in front], cfg.max_accuracy_drop)


# Latency and size are noisy or near-equal between close variants: a challenger must win by this much (and, on
# latency, by more than the round-to-round spread).
PROMOTION_MARGIN = 0.03


def same_variant(challenger: Variant, incumbent: Variant) -> bool:
    """Whether the registered champion (`incumbent`, tagged with the variant id it came from) is `challenger`."""
    return incumbent.params.get("variant_id") == challenger.id


def beats(challenger: Variant, incumbent: Variant, cfg: SelectionConfig) -> bool:
    """Whether the new candidate should replace the registered champion, both measured in the same benchmark.
    The variant that is registered already never replaces itself: two timings of one model differ only by noise."""
    if same_variant(challenger, incumbent):
        return False
    if violations(incumbent, cfg) and not violations(challenger, cfg):
        return True
    if violations(challenger, cfg) and not violations(incumbent, cfg):
        return False
    if cfg.objective == "latency" and latency_tie(challenger, incumbent):
        # as inside a run (best_of): a tie goes to validation accuracy, then to a clearly smaller file
        acc_new, acc_old = challenger.metrics["val_accuracy"], incumbent.metrics["val_accuracy"]
        size_new, size_old = challenger.metrics["size_mb"], incumbent.metrics["size_mb"]
        return acc_new > acc_old or (acc_new == acc_old and size_new < size_old * (1 - PROMOTION_MARGIN))
    new, old = OBJECTIVES[cfg.objective](challenger)[0], OBJECTIVES[cfg.objective](incumbent)[0]
    return new < old - PROMOTION_MARGIN * abs(old)


@task(name="select")
def select_task(variants: list[Variant], cfg: SelectionConfig) -> Selection:
    return select(variants, cfg)
