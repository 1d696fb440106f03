"""Reading an A/B deployment's Prometheus metrics per arm: requests, latency percentiles from the histogram and,
for requests sent with their true labels, accuracy with its Wilson interval; and a verdict per criterion."""

from __future__ import annotations

from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

from squeezeflow.tasks.intervals import wilson


def _percentile(buckets: dict[float, float], q: float) -> float:
    """The q-quantile of a cumulative histogram, linear inside the bucket that holds it."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if not total:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if bound == float("inf"):
                return lower
            share = (rank - below) / max(buckets[bound] - below, 1e-12)
            return lower + share * (bound - lower)
        lower, below = bound, buckets[bound]
    return lower


def compare_arms(metrics_text: str) -> tuple[list[dict], str]:
    """Per arm (from the squeeze_* metrics, summed over replicas) and a one-paragraph verdict."""
    requests: dict[tuple, float] = defaultdict(float)
    labelled: dict[tuple, float] = defaultdict(float)
    correct: dict[tuple, float] = defaultdict(float)
    buckets: dict[tuple, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if "arm" not in sample.labels:
                continue
            arm = (sample.labels["arm"], sample.labels.get("model_version", "?"))
            name = sample.name.removeprefix("ray_")
            if name == "squeeze_requests_total":
                requests[arm] += sample.value
            elif name == "squeeze_labelled_rows_total":
                labelled[arm] += sample.value
            elif name == "squeeze_correct_rows_total":
                correct[arm] += sample.value
            elif name == "squeeze_request_latency_ms_bucket":
                buckets[arm][float(sample.labels["le"])] += sample.value
    arms = []
    for arm in sorted(requests):
        n, k = int(labelled[arm]), int(correct[arm])
        low, high = wilson(k, n) if n else (float("nan"), float("nan"))
        arms.append(
            {
                "arm": arm[0],
                "model_version": arm[1],
                "requests": int(requests[arm]),
                "p50_ms": _percentile(buckets[arm], 0.5) if buckets[arm] else float("nan"),
                "p99_ms": _percentile(buckets[arm], 0.99) if buckets[arm] else float("nan"),
                "labelled": n,
                "accuracy": k / n if n else float("nan"),
                "ci_low": low,
                "ci_high": high,
            }
        )
    return arms, _verdict(arms)


def _verdict(arms: list[dict]) -> str:
    if len(arms) < 2:
        return "one arm only: nothing to compare"
    a, b = arms[0], arms[1]
    faster = min((a, b), key=lambda x: x["p99_ms"])
    lines = [
        f"latency: arm {faster['arm']} ({faster['model_version']}) has the lower p99 "
        f"({a['p99_ms']:.1f} ms vs {b['p99_ms']:.1f} ms, histogram buckets)"
    ]
    if a["labelled"] and b["labelled"]:
        better = max((a, b), key=lambda x: x["accuracy"])
        other = b if better is a else a
        if better["ci_low"] > other["ci_high"]:
            lines.append(f"accuracy: arm {better['arm']} is more accurate (the 95 % intervals do not overlap)")
        else:
            lines.append(
                f"accuracy: no clear winner ({a['accuracy']:.4f} vs {b['accuracy']:.4f}; the 95 % intervals overlap: "
                f"send more labelled requests)"
            )
    else:
        lines.append("accuracy: send requests with their true labels to compare the arms")
    return "; ".join(lines)
