import numpy as np
import pytest

from squeezeflow.tasks.intervals import paired_drop_interval, wilson


def test_wilson_matches_the_textbook_values_and_stays_inside_zero_and_one():
    assert wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    low, high = wilson(10, 10)
    assert high == 1.0 and low == pytest.approx(0.7225, abs=1e-4)
    assert wilson(0, 10)[0] == 0.0
    narrow, wide = wilson(800, 1000), wilson(80, 100)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


def test_the_paired_drop_interval_is_zero_for_identical_answers_and_covers_a_known_difference():
    rng = np.random.default_rng(1)
    reference = rng.random(2000) < 0.9
    assert paired_drop_interval(reference, reference) == (0.0, 0.0)
    variant = reference.copy()
    variant[:40] = ~variant[:40]  # 40 answers of 2000 flipped: the true drop is known exactly
    true_drop = reference.mean() - variant.mean()
    low, high = paired_drop_interval(reference, variant)
    assert low <= true_drop <= high and high - low < 0.02
    assert paired_drop_interval(reference, variant) == (low, high)  # seeded
