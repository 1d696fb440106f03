"""Accuracy, and 95 % intervals for the reported figures: an accuracy (Wilson score) and a paired accuracy drop
(bootstrap over the same examples), so a reader can tell a difference from the noise of a small eval set."""

from __future__ import annotations

import numpy as np

Z95 = 1.959963984540054


def accuracy(predicted, truth) -> float:
    """The share of rows whose prediction is the truth; `predicted` holds logits (one row per example) or labels.
    Every accuracy squeezeflow reports or chooses by is this one."""
    predicted = np.asarray(predicted)
    labels = predicted.argmax(-1) if predicted.ndim == 2 else predicted
    return float((labels == np.asarray(truth)).mean())


def wilson(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion: unlike the normal approximation, it stays inside [0, 1] and is
    sensible at 0 % and 100 %."""
    if total <= 0:
        raise ValueError("wilson: no examples")
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    # exact at the ends: floating point would leave 1 - 2e-16 above an accuracy of 1.0
    low = 0.0 if correct == 0 else max(0.0, float(centre - half))
    high = 1.0 if correct == total else min(1.0, float(centre + half))
    return low, high


def paired_drop_interval(
    reference_correct, variant_correct, *, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """A 95 % percentile-bootstrap interval of mean(reference correct) − mean(variant correct), resampling examples
    (pairs), so what both models get right or wrong alike adds no noise to the difference."""
    diff = np.asarray(reference_correct, dtype=np.float64) - np.asarray(variant_correct, dtype=np.float64)
    if diff.size == 0:
        raise ValueError("paired_drop_interval: no examples")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 256):  # in blocks: a [resamples, n] index matrix of a large eval set is big
        count = min(256, resamples - start)
        means[start : start + count] = diff[rng.integers(0, diff.size, size=(count, diff.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)
